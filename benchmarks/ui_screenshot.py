"""Screenshots of the MLflow UI showing a sweep, taken with headless Chromium (Debian's
`chromium` package): the sweep's parent run (its child runs, tags, metrics) and the comparison
of its best eligible trials (parallel coordinates of their hyperparameters against the final
score, the champion first).

    python benchmarks/ui_screenshot.py --tracking-uri sqlite:///mlflow.db --experiment unlearn-sweep-demo [--out docs]
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", required=True)
    parser.add_argument("--experiment", required=True)
    parser.add_argument("--out", type=Path, default=Path("docs"))
    args = parser.parse_args()
    browser = shutil.which("chromium") or sys.exit("needs Debian's chromium package (apt-get install chromium)")

    from unlearn_sweep.orchestrator import tracking

    client = tracking.client(args.tracking_uri)
    experiment = client.get_experiment_by_name(args.experiment).experiment_id
    parent = client.search_runs(
        [experiment], filter_string="tags.role = 'sweep'", order_by=["attributes.start_time DESC"]
    )[0]
    best = client.search_runs(
        [experiment],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' and tags.eligible = 'true'",
        order_by=["metrics.best_final_score DESC"],
        max_results=6,
    )
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ui = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "ui",
            "--backend-store-uri",
            args.tracking_uri,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(60):
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except OSError:
                time.sleep(1)
        compare = urllib.parse.quote(json.dumps([run.info.run_id for run in best]))
        pages = {
            "mlflow_sweep_parent.png": f"{base}/#/experiments/{experiment}/runs/{parent.info.run_id}",
            "mlflow_sweep_trials.png": f"{base}/#/compare-runs?runs={compare}"
            f"&experiments={urllib.parse.quote(json.dumps([experiment]))}",
        }
        args.out.mkdir(parents=True, exist_ok=True)
        for name, url in pages.items():
            subprocess.run(
                [
                    browser,
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--hide-scrollbars",
                    "--window-size=1600,1000",
                    "--virtual-time-budget=20000",
                    f"--screenshot={args.out / name}",
                    url,
                ],
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            print(f"wrote {args.out / name} ({url})")
    finally:
        ui.terminate()
        ui.wait()


if __name__ == "__main__":
    main()
