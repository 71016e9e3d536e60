# Follows modules/errors.py of A1111 v1.10.1 (tag v1.10.1).
import traceback


def report(message, *, exc_info=False):
    print(message)
    if exc_info:
        traceback.print_exc()
