"""modules/api/api.py: ``init_script_args`` for alwayson scripts and the middleware's
``handle_exception`` (any exception from the request becomes a JSON error, status 500 unless the
exception carries one)."""
from modules import processing


class HTTPException(Exception):
    def __init__(self, status_code, detail=""):
        super().__init__(detail)
        self.status_code, self.detail = status_code, detail


def handle_exception(e):
    err = {"error": type(e).__name__, "detail": vars(e).get("detail", ""), "body": vars(e).get("body", ""), "errors": str(e)}
    return vars(e).get("status_code", 500), err


def init_script_args(request_alwayson, default_script_args, script_runner):
    script_args = list(default_script_args)
    for name, entry in (request_alwayson or {}).items():
        script = next((s for s in script_runner.scripts if s.title().lower() == name), None)
        if script is None:
            raise HTTPException(422, f"always on script {name} not found")
        if "args" in entry:
            for idx in range(0, min(script.args_to - script.args_from, len(entry["args"]))):
                script_args[script.args_from + idx] = entry["args"][idx]
    return script_args


def text2imgapi(request: dict, script_runner, default_script_args):
    """(status, body) as the HTTP API would answer a txt2img request."""
    try:
        args = {k: v for k, v in request.items() if k != "alwayson_scripts"}
        script_args = init_script_args(request.get("alwayson_scripts"), default_script_args, script_runner)
        p = processing.StableDiffusionProcessingTxt2Img(**args)
        p.is_api = True
        p.scripts = script_runner
        p.script_args = tuple(script_args)
        processed = processing.process_images(p)
        return 200, {"images": processed.images, "info": processed.infotexts}
    except Exception as e:
        return handle_exception(e)
