"""The DICOM node: instances received per second against dcmtk's storescp, and study-to-result latency.

``receive``: the same N valid CT instances (the real RSNA sample made valid DICOM, 512x512, ~0.5 MB
each) sent by dcmtk's ``storescu`` in one association, timed from its start to its exit (every instance
acknowledged), to
  * ``storescp``: dcmtk's own Storage SCP writing each instance to a fresh folder (no fsync), with its
    defaults (16 KiB PDUs) and tuned (``-pdu 131072 +B``: the largest PDUs, written as received), and
  * ``pynetdicom_floor``: a bare pynetdicom SCP (in this process) that acknowledges each instance and
    does nothing with it: no pynetdicom node can be faster, and
  * ``ichdet``: ``ichdet serve`` (the node as a child process; quiet time 1 h so no analysis runs during
    the timing) writing each instance to its spool: parse the header, check it, write, fsync, rename,
    and only then acknowledge.
Interleaved rounds, receiver started fresh (untimed) before each; median instances/s and the ratio.
Every dcmtk process runs with ``TCP_NODELAY=1`` (dcmtk's switch for the socket option): with Nagle's
algorithm on, each instance waits for a delayed ACK and storescp tops out near 20 instances/s here
(``--nagle`` keeps dcmtk's default, to see that).

``latency``: a 40-slice study (the sample's 36-slice study plus 4 slices of another, re-identified into
the same series) sent by storescu to the node, which sends its results to Orthanc; the time from
storescu's exit (last instance acknowledged) to Orthanc holding the SR and the secondary captures.
That time = the quiet time (``--quiet``) + analysis + C-STORE of the results + Orthanc filing them.
With ``--bundle`` the node is the real ``ichdet serve --bundle``; without it, the tests' stand-in
analyser (one text SR, one 8x8 SC: the time is then the node's own overhead, no model).

    python bench/bench_serve.py [--instances 150] [--repeats 5] [--bundle model.ichdet] [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import pydicom
from common import RSNA_SAMPLE, Variant, format_machine, machine_info, median, run_interleaved, save_json
from serve_support import (
    REPO,
    STORESCP,
    NodeProcess,
    Orthanc,
    free_port,
    make_valid,
    sample_studies,
    storescu,
    wait_for,
    wait_port,
)


def valid_instances(out: Path, n: int) -> list[Path]:
    """``n`` valid full-size CT instances (sample slices under new UIDs, cycling with a new salt)."""
    sources = [p for files in sample_studies(RSNA_SAMPLE).values() for p in files]
    files = []
    for i in range(n):
        make_valid(sources[i % len(sources)], out / f"{i:04d}.dcm", salt=f"bench{i // len(sources)}")
        files.append(out / f"{i:04d}.dcm")
    return files


def study_of_40(out: Path) -> list[Path]:
    """A valid 40-slice study: the largest sample study and 4 slices of another, moved into its series above it."""
    studies = sorted(sample_studies(RSNA_SAMPLE).values(), key=len, reverse=True)
    main = [make_valid(p, out / p.name, salt="lat") for p in studies[0]]
    top = max(float(ds.ImagePositionPatient[2]) for ds in main)
    step = 5.0
    files = [out / p.name for p in studies[0]]
    for k, src in enumerate(studies[1][:40 - len(main)]):
        ds = make_valid(src, out / src.name, salt="lat")
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "ImageOrientationPatient",
                        "PixelSpacing"):
            setattr(ds, keyword, main[0].get(keyword))
        ds.ImagePositionPatient = [*main[0].ImagePositionPatient[:2], top + step * (k + 1)]
        ds.save_as(out / src.name, enforce_file_format=True)
        files.append(out / src.name)
    return files


def bench_receive(files: list[Path], tmp: Path, repeats: int) -> dict[str, Any]:
    assert STORESCP is not None, "dcmtk's storescp is needed (apt-get install dcmtk)"
    state: dict[str, Any] = {}

    def stop() -> None:
        for key in ("proc", "node", "server"):
            item = state.pop(key, None)
            if key == "server" and item is not None:
                item.shutdown()
            elif isinstance(item, subprocess.Popen):
                item.terminate()
                item.wait()
            elif item is not None:
                item.stop()
        shutil.rmtree(tmp / "rx", ignore_errors=True)

    def storescp(*options: str) -> Any:
        def start() -> None:
            stop()
            (tmp / "rx").mkdir()
            state["port"] = free_port()
            state["proc"] = subprocess.Popen([STORESCP, *options, "-aet", "ICHDET", "-od", str(tmp / "rx"),
                                              str(state["port"])], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_port(state["port"])
        return start

    def start_node() -> None:
        stop()
        (tmp / "rx").mkdir()
        state["port"] = free_port()
        state["node"] = NodeProcess(tmp / "rx" / "spool", state["port"], ["STORESCU"], quiet=3600).start()

    def start_floor() -> None:
        """pynetdicom's own floor: an SCP that accepts each instance and does nothing with it."""
        from pydicom.uid import CTImageStorage
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt

        stop()
        state["port"] = free_port()
        ae = AE("ICHDET")
        ae.maximum_pdu_size = 0
        ae.add_supported_context(CTImageStorage, ALL_TRANSFER_SYNTAXES)
        state["server"] = ae.start_server(("127.0.0.1", state["port"]), block=False,
                                          evt_handlers=[(evt.EVT_C_STORE, lambda event: 0x0000)])

    def send() -> int:
        storescu(state["port"], files)
        return len(files)

    results = run_interleaved([Variant("storescp", send, storescp(), "instances"),
                               Variant("storescp_tuned", send, storescp("-pdu", "131072", "+B"), "instances"),
                               Variant("pynetdicom_floor", send, start_floor, "instances"),
                               Variant("ichdet", send, start_node, "instances")], repeats)
    stop()
    return results


def bench_latency(files: list[Path], tmp: Path, repeats: int, bundle: Path | None, quiet: float) -> dict[str, Any]:
    times, analysis = [], []
    for r in range(repeats):
        root = tmp / f"lat{r}"
        node_port = free_port()
        pacs = Orthanc(root / "orthanc", node_port).start()
        dest = f"ORTHANC@127.0.0.1:{pacs.dicom_port}"
        if bundle is None:
            node: Any = NodeProcess(root / "spool", node_port, ["ORTHANC"], send_to=dest, quiet=quiet).start()
        else:
            cmd = [sys.executable, "-m", "ichdet", "serve", "--bundle", str(bundle), "--spool", str(root / "spool"),
                   "--port", str(node_port), "--allow", "ORTHANC", "--send-to", dest, "--quiet-seconds", str(quiet)]
            log = (root / "node.log").open("wb")
            node = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": str(REPO / "src")}, stderr=log)
            wait_port(node_port, 120)
        try:
            storescu(node_port, files, calling="ORTHANC")
            t0 = time.perf_counter()
            uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)

            def arrived(pacs: Orthanc = pacs, uid: str = uid) -> bool:
                studies = pacs.rest("POST", "/tools/find", {"Level": "Study", "Query": {"StudyInstanceUID": uid}})
                return bool(studies) and {"SR", "OT"} <= set(pacs.modalities(studies[0]))
            wait_for(arrived, 900, "the results in Orthanc", 0.05)
            times.append(time.perf_counter() - t0)
            text = (root / "node.log").read_text() if bundle is not None else node.log_text()
            seconds = [float(line.split(" instances, ")[1].split(" s,")[0]) for line in text.splitlines()
                       if "analysed (" in line]
            analysis.extend(seconds)
        finally:
            if isinstance(node, subprocess.Popen):
                node.terminate()
                node.wait()
            else:
                node.stop()
            pacs.stop()
        last = analysis[-1] if analysis else float("nan")
        print(f"  round {r + 1}/{repeats}: {times[-1]:.2f} s (analysis {last:.2f} s)")
    return {"seconds": times, "median_seconds": median(times), "analysis_seconds": analysis,
            "median_analysis_seconds": median(analysis) if analysis else None, "quiet_seconds": quiet,
            "analyser": "ichdet serve --bundle " + str(bundle) if bundle else "stand-in (no model)"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--instances", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--latency-repeats", type=int, default=3)
    parser.add_argument("--quiet", type=float, default=2.0, help="the node's quiet time in the latency test")
    parser.add_argument("--bundle", type=Path, help="real analysis with this bundle (default: the stand-in)")
    parser.add_argument("--skip", choices=["receive", "latency"], action="append", default=[])
    parser.add_argument("--nagle", action="store_true", help="leave dcmtk's TCP_NODELAY unset (its default)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not args.nagle:
        os.environ["TCP_NODELAY"] = "1"  # inherited by storescu and storescp
    info = machine_info()
    print(format_machine(info))
    report: dict[str, Any] = {"machine": info, "dcmtk_tcp_nodelay": not args.nagle}
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        if "receive" not in args.skip:
            files = valid_instances(tmp / "instances", args.instances)
            res = bench_receive(files, tmp, args.repeats)
            best = max(res["storescp"]["median_rate"], res["storescp_tuned"]["median_rate"])
            ratio = res["ichdet"]["median_rate"] / best
            print(f"receive, {len(files)} instances, one association: storescp {res['storescp']['median_rate']:.1f}/s "
                  f"(tuned: 128 KiB PDUs, bit-preserving: {res['storescp_tuned']['median_rate']:.1f}/s), "
                  f"bare pynetdicom {res['pynetdicom_floor']['median_rate']:.1f}/s, "
                  f"ichdet {res['ichdet']['median_rate']:.1f}/s, ratio to the faster storescp {ratio:.2f}, "
                  f"to bare pynetdicom {res['ichdet']['median_rate'] / res['pynetdicom_floor']['median_rate']:.2f}")
            report["receive"] = {**res, "ratio_to_best_storescp": ratio}
        if "latency" not in args.skip:
            files = study_of_40(tmp / "study40")
            lat = bench_latency(files, tmp, args.latency_repeats, args.bundle, args.quiet)
            print(f"latency, 40-slice study, last instance -> results in Orthanc: median {lat['median_seconds']:.2f} s "
                  f"(quiet {args.quiet} s, analysis {lat['median_analysis_seconds']} s; {lat['analyser']})")
            report["latency"] = lat
    save_json(args.json, report)


if __name__ == "__main__":
    main()
