"""``privacy.html`` (``integration.report_page``): a private run writes it, ``yolo-dp report`` writes
it for a run, a checkpoint and a ledger, and headless Chromium renders it with the run's numbers and
without touching the network."""

from __future__ import annotations

import http.server
import json
import re
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
import torch

from ultralytics_dp import DifferentialPrivacy
from ultralytics_dp.cli import main
from ultralytics_dp.integration import report_page

from helpers import train_tiny

README = Path(__file__).resolve().parents[1] / "README.md"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_browser = pytest.mark.skipif(CHROMIUM is None, reason="no headless Chromium: `make test` installs Debian's "
                                                            "chromium package where apt-get can")


def test_the_readme_lists_what_the_page_says_is_public_and_not_covered():
    text = " ".join(README.read_text().split())
    assert [item for item in (*report_page.PUBLIC, *report_page.NOT_COVERED) if item not in text] == []


@pytest.mark.parametrize("unit,who", [("image", "one training image"), ("person", "one person")])
def test_the_guarantee_sentence_names_the_unit_and_the_numbers(unit, who):
    sentence = report_page.guarantee_sentence({"epsilon": 2.0, "settings": {"delta": 1e-5}, "privacy_unit": unit})
    assert who in sentence and "e^2 = 7.39" in sentence and "1e-05" in sentence


# Chromium calls Google's hosts at start-up whatever the page (seen for a blank page): not the page's
_CHROMIUMS_OWN = re.compile(r"^(GET http://|CONNECT )[\w.-]*\bgoogle\.com[:/]")


class _Recorder(http.server.BaseHTTPRequestHandler):
    """A proxy that answers nothing and remembers every request the browser sent it."""

    seen: list[str] = []

    def _record(self) -> None:
        self.seen.append(f"{self.command} {self.path}")
        self.send_error(502)

    do_GET = do_POST = do_HEAD = do_CONNECT = _record

    def log_message(self, *args) -> None:
        pass


def _render(page: Path, tmp_path: Path) -> tuple[str, Path, list[str]]:
    """Chromium's DOM of ``page``, a screenshot, and the requests it sent through a recording proxy."""
    _Recorder.seen = []
    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'chromium'}", f"--proxy-server=http://127.0.0.1:{proxy.server_port}",
             "--proxy-bypass-list=<-loopback>", "--virtual-time-budget=3000"]
    try:
        dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120,
                             check=True).stdout
        shot = tmp_path / f"{page.stem}.png"
        subprocess.run([*flags, "--window-size=1280,1600", f"--screenshot={shot}", page.as_uri()], capture_output=True,
                       timeout=120, check=True)
    finally:
        proxy.shutdown()
    return dom, shot, [r for r in _Recorder.seen if not _CHROMIUMS_OWN.search(r)]


@needs_browser
def test_the_network_check_sees_a_page_that_loads_something(tmp_path):
    """The proxy check below can fail: a page with one remote image is caught."""
    page = tmp_path / "remote.html"
    page.write_text('<html><body><p>x</p><img src="http://example.invalid/pixel.png"></body></html>')
    _, _, requests = _render(page, tmp_path)
    assert any("example.invalid" in r for r in requests)


@pytest.mark.slow
@needs_browser
def test_a_private_runs_page_renders_its_guarantee_offline(tiny_det, tmp_path):
    dp = DifferentialPrivacy(epsilon=6.0, delta=1e-3, ledger=tmp_path / "ledger.sqlite")
    _, _, save_dir = train_tiny(tiny_det, tmp_path, dp, epochs=1, plots=False)
    page = save_dir / report_page.PAGE
    entry = torch.load(save_dir / "weights" / "last.pt", map_location="cpu", weights_only=False)["dp"]
    dom, shot, requests = _render(page, tmp_path)
    text = " ".join(re.sub(r"<[^>]+>", " ", dom).split())
    assert requests == []
    for value in (f"{entry['epsilon']:.4g}", "0.001", f"{entry['noise_multiplier']:.4g}",
                  f"{entry['sample_rate']:.4g}", str(entry["steps"]), *(f"{v:.6g}" for v in
                                                                         entry["epsilon_by_accountant"].values())):
        assert value in text, value
    assert "For any one training image" in text and "Not covered" in text
    assert 'aria-label="epsilon against optimizer steps"' in dom  # drawn although plots=False
    assert shot.stat().st_size > 50_000  # a rendered page, not a blank one

    # yolo-dp report writes the same page for the run folder and for a checkpoint
    page.unlink()
    assert main(["report", str(save_dir)]) == 0 and page.exists()
    page.unlink()
    assert main(["report", str(save_dir / "weights" / "best.pt")]) == 0 and page.exists()


@pytest.mark.slow
@needs_browser
def test_a_ledgers_page_shows_aggregates_and_no_record_or_person(tmp_path):
    from ultralytics_dp.accounting.ledger import Ledger
    from ultralytics_dp.datasets import embedded
    from ultralytics_dp.integration.training_set import identify_all
    from ultralytics import YOLO

    root = embedded.build("digits-persons-cls", root=tmp_path / "data")
    ledger = tmp_path / "ledger.sqlite"
    model = YOLO("yolo26n-cls.yaml")
    DifferentialPrivacy(epsilon=4.0, delta=1e-4, ledger=ledger, persons="persons.csv").attach(model)
    model.train(data=str(root), epochs=1, imgsz=32, batch=64, workers=0, project=str(tmp_path), name="run",
                plots=False)
    out = tmp_path / "ledger.html"
    assert main(["report", str(ledger), f"out={out}"]) == 0
    dom, _, requests = _render(out, tmp_path)
    text = " ".join(re.sub(r"<[^>]+>", " ", dom).split())
    summary = Ledger(ledger).summary(None)
    assert requests == [] and f"{summary['worst_epsilon']:.4g}" in text
    assert f"{summary['per_person']['worst_epsilon']:.4g}" in text
    html = out.read_text()
    images = sorted((root / "train").rglob("*.png"))
    persons = {line.split(",")[1] for line in (root / "persons.csv").read_text().splitlines()[1:]}
    run = summary["datasets"][0]["runs"][0]
    secrets = [Ledger(ledger).run(run["run_id"])["fingerprint"], *(r.pixels for r in identify_all(images))]
    assert not [s for s in secrets if s in html]
    assert not [p for p in persons if re.search(rf"\b{re.escape(p)}\b", text)]


ENTRY = {"settings": {"epsilon": 2.0, "delta": 1e-5, "max_grad_norm": 1.0}, "epsilon": 1.97,
         "epsilon_by_accountant": {"pld": 1.95, "prv_accountant": 1.97}, "noise_multiplier": 1.3, "sample_rate": 0.1,
         "num_samples": 500, "steps": 40, "stopped_by_budget": False, "accountant": "max(pld, prv_accountant)",
         "accountant_state": {"history": [{"noise_multiplier": 1.3, "sample_rate": 0.1, "steps": 40}]},
         "privacy_unit": "image", "person_epsilon": None, "version": "0"}


def _audited_run(tmp_path: Path, **audit) -> Path:
    (tmp_path / "weights").mkdir(parents=True)
    torch.save({"dp": ENTRY, "train_args": {"epochs": 3, "batch": 50}}, tmp_path / "weights" / "last.pt")
    (tmp_path / "audit.json").write_text(json.dumps({
        "kind": "gradient", "claimed_epsilon": 1.97, "delta": 1e-5, "epsilon_lb": 0.4, "confidence": 0.95,
        "canaries": 1000, "included": 500, "guesses": 100, "correct": 70, "steps": 40, "noise_multiplier": 1.3,
        "sample_rate": 0.1, "ceiling": 5.0, "passed": True, "verdict": "passed", **audit}))
    return tmp_path


def test_a_runs_page_shows_its_own_audit_and_not_another_runs(tmp_path):
    page = report_page.write_run_page(_audited_run(tmp_path / "a"))
    text = page.read_text()
    assert "Empirical audit: <span class=\"pass\">passed" in text and "0.4000 at 95% confidence" in text
    assert "<td>epochs</td><td>3</td>" in text  # the training arguments: the checkpoint's own
    assert "<svg" in text and "data:" not in text and "http" not in text  # an inline chart, nothing to load
    for stale in ({"claimed_epsilon": 1.0}, {"steps": 41}, {"noise_multiplier": 1.2}):  # another run's audit
        text = report_page.write_run_page(_audited_run(tmp_path / str(stale), **stale)).read_text()
        assert "Not audited" in text and "0.4000" not in text
    bad = _audited_run(tmp_path / "bad")
    (bad / "audit.json").write_text('{"claimed_epsilon": 1.97}')
    with pytest.raises(ValueError, match="audit.json is not an audit result"):
        report_page.write_run_page(bad)


def test_report_keys_for_a_ledger_are_refused_for_a_run(tmp_path, capsys):
    run = _audited_run(tmp_path)
    assert main(["report", str(run), "out=x.html"]) == 2
    assert "for a ledger" in capsys.readouterr().err and not (run / "privacy.html").exists()
