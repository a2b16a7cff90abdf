"""palm.evaluation.report: metrics/report.html parses, every embedded image decodes, every number is eval.json's."""

from __future__ import annotations

import base64
import html.parser
import io
import json
import math

import cv2
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from palm.core.errors import DataError
from palm.evaluation.metrics import score
from palm.evaluation.report import fmt, write_report


class Page(html.parser.HTMLParser):
    """Collects the images and the tagged numbers of the page, and checks tags are balanced."""

    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self):
        super().__init__()
        self.images, self.numbers, self.stack, self._key, self.text = [], [], [], None, []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs)
        if tag not in self.VOID:
            self.stack.append(tag)
        if tag == "span" and "data-key" in attrs:
            self._key = attrs["data-key"]

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes <{self.stack[-1] if self.stack else None}>"
        self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)
        if self._key is not None:
            self.numbers.append((self._key, data))
            self._key = None


def report_in(tmp, params):
    """``write_report`` over the inputs the ``inputs`` fixture wrote in ``tmp``."""
    return write_report(
        tmp / "report.html",
        tmp / "eval.json",
        tmp / "predictions.csv",
        tmp,
        tmp / "explain",
        tmp / "labels.csv",
        params,
    )


@pytest.fixture()
def inputs(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.r_[np.ones(30), np.zeros(25)].astype(int)
    probs = np.clip(labels * 0.5 + rng.normal(0.25, 0.2, len(labels)), 0, 1).round(6)
    preds = pd.DataFrame(
        {
            "image": [f"V{i:04d}.jpg" for i in range(len(labels))],
            "label": labels,
            "probability": probs,
            "predicted": (probs >= 0.5).astype(int),
        }
    )
    preds.to_csv(tmp_path / "predictions.csv", index=False)
    m = {"model": "senet18", "threshold_rule": "youden", **score(labels, probs, 0.5)}
    (tmp_path / "eval.json").write_text(json.dumps(m))
    (tmp_path / "model.json").write_text(
        json.dumps(
            {
                "model": "senet18",
                "image_size": 224,
                "input_size": 96,
                "threshold": 0.5,
                "threshold_rule": "youden",
                "config": {"lr": 0.001, "epochs": 12},
            }
        )
    )
    explain = tmp_path / "explain"
    explain.mkdir()
    wrong = preds[preds.predicted != preds.label].image.tolist()
    for name in wrong[:2]:  # heatmaps of two errors, as the explain stage names them
        cv2.imwrite(str(explain / f"{name[:-4]}_label-PM_pred-nonPM_p0.10.png"), np.full((448, 900, 3), 120, np.uint8))
    pd.DataFrame(
        {
            "image": ["a", "b", "c"] + preds.image.tolist(),
            "split": ["train"] * 3 + ["valid"] * len(preds),
            "label": [1, 0, 1] + labels.tolist(),
        }
    ).to_csv(tmp_path / "labels.csv", index=False)
    return tmp_path, m, wrong


def test_report_parses_images_decode_and_numbers_match_eval_json(inputs):
    tmp, m, wrong = inputs
    out = report_in(tmp, {"data": {"source": "palm", "input": "data/original"}})
    page = Page()
    page.feed(out.read_text(encoding="utf-8"))
    page.close()
    assert page.stack == []  # every element closed
    # self-contained: every image is embedded and decodes; the 4 plots and the 2 heatmaps
    assert len(page.images) == 6
    for attrs in page.images:
        assert attrs["src"].startswith("data:image/png;base64,"), attrs["src"][:40]
        im = Image.open(io.BytesIO(base64.b64decode(attrs["src"].split(",", 1)[1])))
        im.load()
        assert min(im.size) > 100 and attrs.get("alt")
    # every number tagged with a key is eval.json's, as written; every interval is there
    keys = {k for k, _ in page.numbers}
    for key, text in page.numbers:
        assert key in m, key
        assert text == fmt(m[key]), (key, text, m[key])
        if m[key] is not None and not isinstance(m[key], int):
            assert float(text) == pytest.approx(m[key], abs=5e-4)
    for key in ("accuracy", "sensitivity", "specificity", "precision", "f1", "auc", "brier", "ppv_at_prevalence"):
        assert {key, f"{key}_ci_low", f"{key}_ci_high"} <= keys, key
    assert {
        "tp",
        "fp",
        "tn",
        "fn",
        "ece",
        "sensitivity_at_specificity_90",
        "specificity_at_sensitivity_95",
        "threshold",
        "prevalence",
    } <= keys
    text = " ".join(page.text)
    assert "not a diagnosis" in text and "Single-source data" in text and "synthetic" in text
    assert "youden" in text and all(w in text for w in wrong[:2])


def test_missing_inputs_are_a_clear_error_and_write_nothing(inputs):
    tmp, _, _ = inputs
    (tmp / "eval.json").unlink()
    with pytest.raises(DataError, match="eval.json: not found"):
        report_in(tmp, {})
    assert not (tmp / "report.html").exists()


def test_fmt():
    assert fmt(None) == "n/a" and fmt(3) == "3" and fmt(0.12345) == "0.123" and fmt(1.0) == "1.000"
    assert not math.isnan(float(fmt(0.5)))


def test_the_page_escapes_what_it_reads_and_its_template_ships_with_the_package(inputs):
    """Autoescaping: a folder name or a model.json value with markup is text, never HTML."""
    from importlib.resources import files

    tmp, _, _ = inputs
    info = json.loads((tmp / "model.json").read_text())
    info["config"]["note"] = "<script>alert(1)</script>"
    (tmp / "model.json").write_text(json.dumps(info))
    out = report_in(tmp, {"data": {"source": "folder", "input": "<b>clinic</b> & co"}})
    text = out.read_text(encoding="utf-8")
    assert "<script>" not in text and "&lt;script&gt;" in text
    assert "<b>clinic</b>" not in text and "&lt;b&gt;clinic&lt;/b&gt; &amp; co" in text
    assert files("palm.evaluation.report").joinpath("templates", "report.html.j2").is_file()


def test_the_report_stage_imports_no_paddle():
    """The report reads model.json through palm.nn.modelinfo: a network's code is none of its business."""
    import subprocess
    import sys

    code = "import sys, palm.evaluation.report; print('paddle' in sys.modules, 'palm.nn.models' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
