"""Cohort batches on the shared data: a local Ray cluster (2 workers, node on a loopback address) runs 7 studies
(BraTS 2013 pat0001-0004 and ms-lesjak patient07/26 with the weights-free engine prompted from their expert masks,
plus a truncated copy of a FLAIR); one worker process is killed by pid mid-run; a second run skips everything
finished; the study report opens in headless Chromium. Also: U-Net studies with a model per study (serial),
cancel with a consistent table, manifest errors, energy readings offline."""
from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest

from conftest import data_path
from faults import digests, truncate

pytest.importorskip("ray")
pytest.importorskip("pyarrow")

from mrisegassist.batch import BatchConfig, ResultsTable, WorkflowOptions, run_batch  # noqa: E402
from mrisegassist.batch.energy import EnergyMeter, check_country  # noqa: E402
from mrisegassist.batch.studies import discover_studies  # noqa: E402
from mrisegassist.cli import main  # noqa: E402
from mrisegassist.errors import InputError  # noqa: E402
from mrisegassist.labels import read_labelmap  # noqa: E402
from mrisegassist.progress import CancelToken  # noqa: E402

CLASSICAL = WorkflowOptions("mask", mask_from="reference", target="flair", distances=False)


def _manifest(tmp_path, rows: list[str], header: str = "case,flair,t1c,reference,site") -> str:
    path = tmp_path / "cohort.csv"
    path.write_text("\n".join([header] + rows) + "\n")
    return str(path)


def _cohort(tmp_path) -> str:
    """6 real studies + 1 truncated copy of pat0002's FLAIR; grouping column ``site`` = the data set."""
    rows = []
    for case in ("pat0001", "pat0002", "pat0003", "pat0004"):
        d = data_path("brats2013-deepmedic", case)
        rows.append(f"{case},{d / 'flair.nii.gz'},{d / 't1c.nii.gz'},{d / 'labels.nii.gz'},brats2013")
    for case in ("patient07", "patient26"):
        d = data_path("ms-lesjak", case)
        rows.append(f"{case},{d / 'flair.nii.gz'},{d / 't1post.nii.gz'},{d / 'lesions.nii.gz'},ljubljana")
    broken = tmp_path / "broken-flair.nii.gz"
    broken.write_bytes((data_path("brats2013-deepmedic", "pat0002") / "flair.nii.gz").read_bytes())
    truncate(broken, 0.6)
    d = data_path("brats2013-deepmedic", "pat0002")
    rows.insert(2, f"broken,{broken},{d / 't1c.nii.gz'},{d / 'labels.nii.gz'},brats2013")
    return _manifest(tmp_path, rows)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray cluster (2 CPUs) shared by this module's runs."""
    import ray

    from mrisegassist.batch.runner import LOCAL_NODE_IP, connect_ray

    connect_ray(num_cpus=2)
    assert ray.get_runtime_context().gcs_address.startswith(LOCAL_NODE_IP)  # loopback, not the network address
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def cohort_run(ray_local, tmp_path_factory):
    """The 7-study batch on 2 Ray workers with one worker killed by pid mid-run (1 s after its third study
    was dispatched), then the same batch again."""
    tmp = tmp_path_factory.mktemp("cohort")
    config = BatchConfig(_cohort(tmp), tmp / "out", CLASSICAL, workers=2, progress=False, table_every_s=0.0)
    events, killed = [], []

    def on_event(event):
        events.append(event)
        if event.kind == "dispatched" and sum(e.kind == "dispatched" for e in events) == 3:
            killed.append(event.worker_pid)
            threading.Timer(1.0, os.kill, (event.worker_pid, signal.SIGKILL)).start()

    first = run_batch(config, on_event=on_event)
    studies = tmp / "out" / "studies"
    written = digests([studies])
    second_events = []
    second = run_batch(config, on_event=second_events.append)
    return dict(config=config, first=first, second=second, events=events, killed=killed, written=written,
                after=digests([studies]), second_events=second_events, out=tmp / "out")


@pytest.mark.slow
@pytest.mark.data
def test_ray_batch_complete_table_corrupt_study_failed(cohort_run):
    first, out = cohort_run["first"], cohort_run["out"]
    assert first.mode == "ray" and first.workers == 2 and first.studies == 7
    assert (first.done, first.failed, first.pending, first.cancelled) == (6, 1, 0, False)
    table = ResultsTable.read(out)
    frame = table.frame.set_index("case")
    assert sorted(frame.index) == sorted(["pat0001", "pat0002", "pat0003", "pat0004", "broken", "patient07",
                                          "patient26"])
    csv = ResultsTable.read(out / "results.csv").frame.set_index("case")
    assert list(csv.index) == list(frame.index) and (csv["status"] == frame["status"]).all()
    broken = frame.loc["broken"]
    assert broken["status"] == "failed" and broken["error_kind"] == "DamagedFileError"
    assert "broken-flair.nii.gz" in broken["error"] and "truncated" in broken["error"]
    assert not (out / "studies" / "broken" / "labels.nii.gz").exists()
    done = frame[frame["status"] == "done"]
    assert len(done) == 6
    # weights-free engine prompted from the expert masks (expert labels): README range 0.65-0.91 per case
    assert (done["dice:foreground"] > 0.5).all(), done["dice:foreground"]
    assert (done["objects"] >= 1).all() and (done["total_ml"] > 0).all()
    assert set(done["group:site"]) == {"brats2013", "ljubljana"}
    assert (done["seconds"] > 0).all() and (done["compute_s"] > 0).all() and (done["device"] == "cpu").all()
    assert (done["energy_kwh"] > 0).all() and done["energy_method"].str.contains("CPU").all()
    for case in done.index:
        labels = read_labelmap(out / done.loc[case, "labels"])
        assert labels.volume.array.any() and labels.labels
    assert first.energy_studies.energy_kwh == pytest.approx(frame["energy_kwh"].sum(), rel=1e-6)


@pytest.mark.slow
@pytest.mark.data
def test_killed_worker_study_finished_elsewhere(cohort_run):
    first, events, killed = cohort_run["first"], cohort_run["events"], cohort_run["killed"]
    assert len(killed) == 1
    deaths = [e for e in events if e.kind == "worker-died"]
    assert len(deaths) == 1 and deaths[0].worker_pid == killed[0] and first.worker_deaths == 1
    case = deaths[0].case
    assert first.retried == [case]
    frame = ResultsTable.read(cohort_run["out"]).frame.set_index("case")
    row = frame.loc[case]
    assert row["attempts"] == 2 and row["worker_pid"] != killed[0]
    assert row["status"] == ("failed" if case == "broken" else "done")
    assert not _alive(killed[0])
    started = [e.worker_pid for e in events if e.kind == "started"]
    assert len(started) == 3 and killed[0] in started  # 2 workers + 1 replacement


@pytest.mark.slow
@pytest.mark.data
def test_second_run_skips_everything_finished(cohort_run):
    second = cohort_run["second"]
    assert (second.skipped, second.done, second.failed, second.pending) == (7, 0, 0, 0)
    assert [e.kind for e in cohort_run["second_events"]] == []  # no worker started, nothing dispatched
    assert cohort_run["after"] == cohort_run["written"]  # no study output rewritten
    assert len(ResultsTable.read(cohort_run["out"]).frame) == 7
    import json

    runs = json.loads((cohort_run["out"] / "runs.json").read_text())["runs"]
    assert [r["done"] for r in runs] == [6, 0] and [r["skipped"] for r in runs] == [0, 7]


@pytest.mark.slow
@pytest.mark.data
def test_report_in_chromium_plots_render_and_numbers_match(cohort_run, artifacts):
    from mrisegassist.bench.browser import CHROMIUM, CHROMIUM_ARGS, chromium_missing_reason

    reason = chromium_missing_reason()
    if reason:
        pytest.skip(reason)
    out = cohort_run["out"]
    assert main(["report", str(out), "-o", str(out / "report.html"), "--worst", "3"]) == 0
    table = ResultsTable.read(out)
    done = table.done
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1300, "height": 1000})
            page.goto((out / "report.html").as_uri())
            page.wait_for_load_state("load")
            images = page.evaluate("Array.from(document.images).map(i => [i.id, i.complete, i.naturalWidth, "
                                   "i.naturalHeight])")
            cells = page.evaluate("(id) => Array.from(document.querySelectorAll(`#${id} tbody tr`)).map("
                                  "r => Array.from(r.cells).map(c => c.innerText.trim()))", "dice-table")
            summary = dict(page.evaluate("Array.from(document.querySelectorAll('#summary tbody tr')).map("
                                         "r => Array.from(r.cells).map(c => c.innerText.trim()))"))
            groups = page.evaluate("Array.from(document.querySelectorAll('[id=\"group-site\"] tbody tr')).map("
                                   "r => Array.from(r.cells).map(c => c.innerText.trim()))")
            worst = page.evaluate("Array.from(document.querySelectorAll('#worst tbody tr')).map("
                                  "r => Array.from(r.cells).slice(0, 2).map(c => c.innerText.trim()))")
            failed = page.inner_text("#failed")
            shot = artifacts / "batch" / "report.png"
            shot.parent.mkdir(exist_ok=True)
            page.screenshot(path=str(shot), full_page=True)
            box = page.locator("#plot-dice").bounding_box()
        finally:
            browser.close()
    ids = {i[0] for i in images}
    assert {"plot-dice", "plot-volumes", "plot-group-site", "plot-time-energy"} <= ids
    assert sum(i[0].startswith("thumb-") for i in images) == 3
    assert all(complete and w > 0 and h > 0 for _, complete, w, h in images), images
    # numbers shown = the table's
    assert summary["studies"] == "7" and summary["done"] == "6" and summary["failed"] == "1"
    fg = done["dice:foreground"].to_numpy(dtype=float)
    row = next(r for r in cells if r[0] == "foreground")
    assert row[1:] == [str(fg.size), f"{fg.mean():.3f}", f"{np.median(fg):.3f}", f"{fg.min():.3f}", f"{fg.max():.3f}"]
    expected = {site: (len(g), f"{g['dice:foreground'].mean():.3f}") for site, g in done.groupby("group:site")}
    assert {r[0]: (int(r[1]), r[2]) for r in groups} == expected
    lowest = done.sort_values("dice:foreground").head(3)
    assert worst == [[c, f"{d:.3f}"] for c, d in zip(lowest["case"], lowest["dice:foreground"])]
    assert "broken" in failed and "DamagedFileError" in failed
    # the screenshot shows the plot: its region is not blank
    import matplotlib.image as mpimg

    pixels = mpimg.imread(shot)
    region = pixels[int(box["y"]):int(box["y"] + box["height"]), int(box["x"]):int(box["x"] + box["width"]), :3]
    assert region.size and (region < 0.9).mean() > 0.02 and len(np.unique(region.reshape(-1, 3), axis=0)) > 20


@pytest.mark.slow
@pytest.mark.data
def test_unet_model_per_study_serial_with_metrics(tmp_path):
    """U-Net studies with the right shipped model each (manifest 'model' column), serial, Dice against the
    expert labels per label and per BraTS region."""
    b, m = data_path("brats2013-deepmedic", "pat0001"), data_path("ms-lesjak", "patient07")
    manifest = _manifest(tmp_path, [
        f"pat0001,{b / 'flair.nii.gz'},{b / 't1c.nii.gz'},{b / 'labels.nii.gz'},glioma-2d,siteA",
        f"patient07,{m / 'flair.nii.gz'},,{m / 'lesions.nii.gz'},ms-lesions-2d,siteB"],
        header="case,flair,t1c,reference,model,site")
    code = main(["batch", manifest, "-o", str(tmp_path / "out"), "--serial", "--workflow", "unet", "--quiet",
                 "--no-distances"])
    assert code == 0
    frame = ResultsTable.read(tmp_path / "out").frame.set_index("case")
    assert frame.loc["pat0001", "model"] == "glioma-2d" and frame.loc["patient07", "model"] == "ms-lesions-2d"
    # model cards (expert labels, held-out cases): glioma-2d whole tumour 0.82, ms-lesions-2d 0.35
    assert frame.loc["pat0001", "dice:[whole tumour]"] > 0.6
    assert frame.loc["patient07", "dice:MS lesion"] > 0.15
    assert frame.loc["pat0001", "volume_ml:oedema"] > 10 and np.isnan(frame.loc["patient07", "volume_ml:oedema"])
    assert frame.loc["patient07", "group:site"] == "siteB"


@pytest.mark.data
def test_cancel_leaves_consistent_table_then_resume(tmp_path):
    d = data_path("itksnap-mricrop")
    rows = []
    for n in range(3):
        rows.append(f"crop{n},{d / 't1.gipl.gz'},,{d / 'labels.gipl.gz'},s{n % 2}")
    manifest = _manifest(tmp_path, rows, header="case,t1,t1c,reference,site")
    config = BatchConfig(manifest, tmp_path / "out", WorkflowOptions("mask", mask_from="reference"), serial=True,
                         progress=False, energy=False)
    cancel = CancelToken()

    def on_event(event):
        if event.kind == "finished":
            cancel.cancel()

    first = run_batch(config, cancel=cancel, on_event=on_event)
    assert first.cancelled and first.done == 1 and first.pending == 2
    table = ResultsTable.read(tmp_path / "out").frame
    assert list(table["case"]) == ["crop0"] and list(table["status"]) == ["done"]
    assert sorted(p.name for p in (tmp_path / "out" / "studies").iterdir()) == ["crop0"]
    second = run_batch(config)
    assert (second.skipped, second.done, second.cancelled) == (1, 2, False)
    assert list(ResultsTable.read(tmp_path / "out").frame["case"]) == ["crop0", "crop1", "crop2"]
    # a changed option is a different result: nothing is reused
    third = run_batch(BatchConfig(manifest, tmp_path / "out", WorkflowOptions("mask", mask_from="reference",
                                                                              strategy="B"),
                                  serial=True, progress=False, energy=False))
    assert (third.skipped, third.done) == (0, 3)


def test_manifest_errors_name_the_line(tmp_path):
    d = data_path("itksnap-mricrop")
    cases = [("bad/id", f"{d / 't1.gipl.gz'}", "case id"), ("x", str(tmp_path / "missing.nii.gz"), "line 2"),
             ("x", "", "no sequence file")]
    for case, path, words in cases:
        manifest = _manifest(tmp_path, [f"{case},{path}"], header="case,t1")
        with pytest.raises(InputError, match=words):
            discover_studies(manifest)
    with pytest.raises(InputError, match="appears twice"):
        discover_studies(_manifest(tmp_path, [f"a,{d / 't1.gipl.gz'}"] * 2, header="case,t1"))
    with pytest.raises(InputError, match="no sequence column"):
        discover_studies(_manifest(tmp_path, ["a,b"], header="case,site"))
    assert main(["batch", str(tmp_path / "nothing.csv"), "-o", str(tmp_path / "o"), "--serial"]) == 2
    with pytest.raises(InputError, match="ISO 3166"):
        check_country("XYZ")


def test_energy_meter_offline():
    pytest.importorskip("codecarbon")
    meter = EnergyMeter("CHE")
    meter.start("busy")
    t = time.perf_counter()
    while time.perf_counter() - t < 0.3:
        sum(range(10000))
    reading = meter.stop()
    assert reading.energy_kwh is not None and reading.energy_kwh > 0 and reading.emissions_kg > 0
    assert reading.country == "CHE" and reading.method and reading.duration_s >= 0.25
    off = EnergyMeter(enabled=False)
    off.start("x")
    assert off.stop().energy_kwh is None and "disabled" in off.stop().method


@pytest.mark.data
def test_folder_of_case_folders_cli_and_outputs_outside_cases(tmp_path, capsys):
    d = data_path("itksnap-mricrop")
    cohort = tmp_path / "cohort"
    for case in ("caseA", "caseB"):
        (cohort / case).mkdir(parents=True)
        (cohort / case / "t1.gipl.gz").symlink_to(d / "t1.gipl.gz")
        (cohort / case / "labels.gipl.gz").symlink_to(d / "labels.gipl.gz")
    studies = discover_studies(cohort)
    assert [s.case for s in studies] == ["caseA", "caseB"] and studies[0].reference.name == "labels.gipl.gz"
    args = ["--serial", "--workflow", "mask", "--mask-from", "reference", "--quiet", "--no-energy"]
    assert main(["batch", str(cohort), "-o", str(cohort / "caseA" / "out")] + args) == 2
    assert "inside the case folder" in capsys.readouterr().err and not (cohort / "caseA" / "out").exists()
    before = digests([cohort])
    assert main(["batch", str(cohort), "-o", str(tmp_path / "out")] + args) == 0
    assert digests([cohort]) == before  # inputs untouched
    frame = ResultsTable.read(tmp_path / "out" / "results.csv").frame
    assert list(frame["status"]) == ["done", "done"] and (frame["dice:foreground"] > 0.3).all()
    assert main(["report", str(tmp_path / "out")]) == 0 and (tmp_path / "out" / "report.html").stat().st_size
