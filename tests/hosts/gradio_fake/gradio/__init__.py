# No host module: records the gradio calls our guidance UI makes (gradio 3.41 / 4.x signatures).
"""A recording stand-in of the gradio subset our UI uses (components keep their kwargs and value)."""

created = []


class _Layout:
    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class Blocks(_Layout):
    pass


class Accordion(_Layout):
    pass


class Row(_Layout):
    pass


class Group(_Layout):
    pass


class _Component:
    def __init__(self, value=None, *, label=None, elem_id=None, **kwargs):
        self.value, self.label, self.elem_id, self.kwargs = value, label, elem_id, kwargs
        created.append(self)


class Checkbox(_Component):
    pass


class Number(_Component):
    pass


class Textbox(_Component):
    pass


class Markdown(_Component):
    pass


class Slider(_Component):
    def __init__(self, minimum=0, maximum=100, step=None, value=None, **kwargs):
        super().__init__(value, **kwargs)
        self.minimum, self.maximum, self.step = minimum, maximum, step


class Dropdown(_Component):
    def __init__(self, choices=None, value=None, **kwargs):
        super().__init__(value, **kwargs)
        self.choices = choices


def update(**kwargs):
    return {"__type__": "generic_update", **kwargs}
