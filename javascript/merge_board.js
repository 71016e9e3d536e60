// Merge Board client sugar: the block sliders, α and the weight string follow each other instantly.
// The weight string is the source of truth; the server rebuilds the whole block area from it on
// every committed change (Board.block_state), so the board works without this script. Here only
// the in-between states of a drag or of typing are shown, and a committed value reaches gradio's
// copy of the string at once (a Save clicked right after typing α reads the new string).
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

    function clampTo(input, v) {
        var lo = Number(input.min), hi = Number(input.max);
        if (input.min !== "" && isFinite(lo)) v = Math.max(lo, v);
        if (input.max !== "" && isFinite(hi)) v = Math.min(hi, v);
        return v;
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
            box.querySelectorAll("input").forEach(function (input) {
                var v = clampTo(input, vec[k]);
                if (Number(input.value) !== v) {
                    input.value = String(v);
                    fire(input);
                }
            });
        });
    }

    // α sets every block: while dragging or typing only the text follows; when the value is
    // committed (slider let go, Enter, leaving the box) gradio's string and the sliders follow too.
    function onAlpha(value, commit) {
        var field = textField("mergeboard_weights");
        if (!field || !isFinite(value)) return;
        var text = archBlocks().map(function () { return fmt(value); }).join(",");
        if (field.value !== text) field.value = text;
        if (commit) {
            fire(field);
            onWeights(text);
        }
    }

    // Enter in a slider's number box commits it like leaving the box (gradio reports "release"
    // on blur only, so without this a typed α waited for the next click elsewhere).
    function onKey(event) {
        var target = event.target;
        if (event.key !== "Enter" || !target || !target.closest || target.type !== "number") return;
        if (target.closest("#mergeboard_alpha, #mergeboard_beta, [id^='mergeboard_w_']")) target.blur();
    }

    function handler(event) {
        if (syncing) return;
        var target = event.target;
        if (!target || !target.closest) return;
        var slider = target.closest("[id^='mergeboard_w_']");
        var weights = target.closest("#mergeboard_weights");
        var alpha = target.closest("#mergeboard_alpha");
        if (!slider && !weights && !alpha) return;
        if (target.value === "" && !weights) return; // a number box being typed into ("-", "")
        syncing = true;
        try {
            if (slider) onSlider(slider.id.substring("mergeboard_w_".length), Number(target.value), event.type === "change");
            else if (alpha) onAlpha(Number(target.value), event.type === "change");
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
        document.addEventListener("keydown", onKey, true);
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
