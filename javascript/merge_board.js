// Merge Board client sugar: the block sliders and the weight string follow each other instantly.
// The server does the same on slider release and on string submit, so the board works without JS.
// Only element ids and tag names are used (no gradio class names): the DOM differs between
// gradio 3.41 (A1111) and 4.x (Forge).
(function () {
    "use strict";
    if (window.mergeboardSetup) return;

    var BLOCKS26 = ["BASE"];
    var i;
    for (i = 0; i < 12; i++) BLOCKS26.push("IN" + (i < 10 ? "0" : "") + i);
    BLOCKS26.push("M00");
    for (i = 0; i < 12; i++) BLOCKS26.push("OUT" + (i < 10 ? "0" : "") + i);
    var BLOCKS20 = BLOCKS26.filter(function (b) { return !/^(IN|OUT)(09|10|11)$/.test(b); });
    var NUMBER = /^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$/;
    var syncing = false;

    function root() {
        return (typeof gradioApp === "function") ? gradioApp() : document;
    }

    function byId(id) {
        return root().querySelector("#" + id) || document.getElementById(id);
    }

    function textField(id) {
        var box = byId(id);
        return box ? box.querySelector("textarea, input") : null;
    }

    function archBlocks() {
        var info = byId("mergeboard_arch");
        var tag = info ? info.querySelector("[data-arch]") : null;
        return tag && tag.getAttribute("data-arch") === "sdxl" ? BLOCKS20 : BLOCKS26;
    }

    function fmt(v) {
        if (v === 0) return "0";
        var s = String(Math.round(v * 1e6) / 1e6);
        return s;
    }

    function parseVector(text) {
        var items = (text || "").split(",").map(function (s) { return s.trim(); });
        if (items.length && items[items.length - 1] === "") items.pop();
        if (!items.every(function (s) { return NUMBER.test(s); })) return null;
        return items.map(Number);
    }

    function sliderValue(name) {
        var box = byId("mergeboard_w_" + name);
        var input = box ? box.querySelector("input[type=number], input[type=range]") : null;
        return input ? Number(input.value) : 0;
    }

    function fire(input) {
        input.dispatchEvent(new Event("input", { bubbles: true }));
    }

    // While a slider is dragged only the text is updated; gradio hears about it once, when the
    // slider is let go ("change"). Telling it at every step sent one recipe update per step, and
    // the host runs those concurrently, so an earlier step could land last and be the one previewed.
    function onSlider(name, value, commit) {
        var field = textField("mergeboard_weights");
        if (!field || !isFinite(value)) return;
        var names = archBlocks();
        var vec = parseVector(field.value);
        if (!vec || vec.length !== names.length) vec = names.map(sliderValue);
        var at = names.indexOf(name);
        if (at < 0) return;
        vec[at] = value;
        var text = vec.map(fmt).join(",");
        if (field.value !== text) field.value = text;
        if (commit) fire(field);
    }

    function onWeights(text) {
        var vec = parseVector(text);
        var names = archBlocks();
        if (!vec || vec.length !== names.length) return; // presets and overrides: the server parses them on Enter
        names.forEach(function (name, k) {
            var box = byId("mergeboard_w_" + name);
            if (!box) return;
            var v = Math.min(1, Math.max(0, vec[k]));
            box.querySelectorAll("input").forEach(function (input) {
                if (Number(input.value) !== v) {
                    input.value = String(v);
                    fire(input);
                }
            });
        });
    }

    function handler(event) {
        if (syncing) return;
        var target = event.target;
        if (!target || !target.closest) return;
        var slider = target.closest("[id^='mergeboard_w_']");
        var weights = target.closest("#mergeboard_weights");
        if (!slider && !weights) return;
        syncing = true;
        try {
            if (slider) onSlider(slider.id.substring("mergeboard_w_".length), Number(target.value), event.type === "change");
            else if (event.type === "input") onWeights(target.value);
        } finally {
            syncing = false;
        }
    }

    window.mergeboardSetup = function () {
        if (window.mergeboardSetupDone) return;
        window.mergeboardSetupDone = true;
        document.addEventListener("input", handler, true);
        document.addEventListener("change", handler, true);
    };

    // After a save: let the WebUI's own checkpoint dropdown pick up the new file at once.
    window.mergeboardAfterSave = function () {
        var button = byId("refresh_sd_model_checkpoint");
        if (button) button.click();
    };

    if (typeof onUiLoaded === "function") {
        onUiLoaded(window.mergeboardSetup);
    } else if (document.readyState === "loading") {
        document.addEventListener("DOMContentLoaded", window.mergeboardSetup);
    } else {
        window.mergeboardSetup();
    }
})();
