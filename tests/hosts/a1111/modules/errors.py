import traceback


def report(message, *, exc_info=False):
    print(message)
    if exc_info:
        traceback.print_exc()
