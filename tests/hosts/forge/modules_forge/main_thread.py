# Follows modules_forge/main_thread.py of Forge dfdcbab685e5 (lllyasviel/stable-diffusion-webui-forge).
"""modules_forge/main_thread.py: every generation runs on one thread; callers wait for the result
(an exception is printed and the result is None)."""
import threading
import time
import traceback

lock = threading.Lock()
last_id = 0
waiting_list = []
finished_list = []
last_exception = None
thread_ids = set()


class Task:
    def __init__(self, task_id, func, args, kwargs):
        self.task_id, self.func, self.args, self.kwargs = task_id, func, args, kwargs
        self.result = None
        self.exception = None

    def work(self):
        global last_exception
        try:
            self.result = self.func(*self.args, **self.kwargs)
        except Exception as e:
            traceback.print_exc()
            self.exception = last_exception = e


def loop():
    thread_ids.add(threading.get_ident())
    while True:
        time.sleep(0.01)
        if waiting_list:
            with lock:
                task = waiting_list.pop(0)
            task.work()
            with lock:
                finished_list.append(task)


def async_run(func, *args, **kwargs):
    global last_id
    with lock:
        last_id += 1
        waiting_list.append(Task(last_id, func, args, kwargs))
    return last_id


def run_and_wait_result(func, *args, **kwargs):
    current_id = async_run(func, *args, **kwargs)
    while True:
        time.sleep(0.01)
        for t in list(finished_list):
            if t.task_id == current_id:
                with lock:
                    finished_list.remove(t)
                return t.result


threading.Thread(target=loop, daemon=True).start()
