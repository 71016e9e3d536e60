# Follows modules/api/api.py of A1111 v1.10.1 (tag v1.10.1).
"""modules/api/api.py: ``init_script_args`` for alwayson scripts and the middleware's
``handle_exception`` (any exception from the request becomes a JSON error, status 500 unless the
exception carries one; a traceback is printed for every exception but fastapi's HTTPException)."""
from fastapi.exceptions import HTTPException

from modules import errors, processing


def handle_exception(e):
    err = {"error": type(e).__name__, "detail": vars(e).get("detail", ""), "body": vars(e).get("body", ""), "errors": str(e)}
    if not isinstance(e, HTTPException):  # do not print backtrace on known httpexceptions
        errors.report(f"API error: POST: /sdapi/v1/txt2img {err}", exc_info=True)
    return vars(e).get("status_code", 500), err


def init_script_args(request_alwayson, default_script_args, script_runner):
    script_args = list(default_script_args)
    for name, entry in (request_alwayson or {}).items():
        script = next((s for s in script_runner.scripts if s.title().lower() == name), None)
        if script is None:
            raise HTTPException(status_code=422, detail=f"always on script {name} not found")
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
