"""Screenshots of the MLflow UI for the docs, taken in a real browser:

    python docs/screenshots.py    # docs/img/mlflow-experiment.png, docs/img/mlflow-compare.png

It starts `mlflow server` on a free loopback port over a temporary store, runs a small study into
experiment `skindiff` (`skindiff main`: scenario i, seed 0, the tiny classifier, a few steps;
under 2 minutes on 2 CPU cores), then opens the experiment page and the comparison of
scenario i's train_classifier runs in headless Chromium (Debian: `apt-get install chromium`),
waits until they show those runs and saves each page. The browser is driven over the DevTools
protocol on a pipe (no package to install): it has to click, which a `--screenshot` command
line cannot, to close the MLflow Assistant (it opens by itself on a first visit to a local
server) and unfold the study's nested runs.
"""

import base64
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from urllib.parse import quote

import mlflow

from skindiff.tracking.names import ENTRY_POINT_TAG, Stage

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the tests' server launcher (the test extra's pytest)
from servers import mlflow_server  # noqa: E402

IMAGES = Path(__file__).resolve().parent / "img"
EXPERIMENT = "skindiff"
SIZE = (1600, 1000)
# A small study: every stage and the three classifiers of scenario i, each for a few steps.
STUDY = [
    *("main", "--scenarios", "i", "--seeds", "0", "--archs", "tiny"),
    *("--ti-max-train-steps", "4", "--ti-per-token", "false", "--lora-max-train-steps", "4"),
    *("--num-per-image", "1", "--num-inference-steps", "4", "--output-size", "32"),
    *("--finetune", "full", "--epochs", "2", "--batch-size", "16", "--image-size", "32"),
]
# The run names `main` gives: the study, its scenario and seed, one classifier per train type.
STUDY_RUN, SEED_RUN = "main", "i/seed-0"
CLASSIFIER_RUNS = ("i/seed-0/tiny/real", "i/seed-0/tiny/syn", "i/seed-0/tiny/real+syn")
ASSISTANT_CLOSE = '[data-component-id="mlflow.assistant.chat_panel.close"]'


def main() -> None:
    chromium = next(filter(None, map(shutil.which, ("chromium", "chromium-browser"))), None)
    if chromium is None:
        sys.exit("error: no chromium on PATH (Debian: apt-get install chromium)")
    IMAGES.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        with mlflow_server(root, f"sqlite:///{root / 'mlflow.db'}") as uri:
            take_screenshots(chromium, root, uri)
    print(f"wrote {IMAGES / 'mlflow-experiment.png'} and {IMAGES / 'mlflow-compare.png'}")


def take_screenshots(chromium: str, root: Path, uri: str) -> None:
    """Runs the small study against the server at `uri` and saves the two pages."""
    chosen = ("MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID")  # the study goes to EXPERIMENT only
    env = {key: value for key, value in os.environ.items() if key not in chosen}
    env |= {"MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_NAME": EXPERIMENT}
    # The console script of this Python: the runs' Source column then reads `skindiff`.
    study = [str(Path(sys.executable).with_name("skindiff")), *STUDY]
    subprocess.run(study, cwd=root, env=env, check=True)

    client = mlflow.MlflowClient(uri)
    experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    classifiers = client.search_runs(
        [experiment_id],
        f"tags.`{ENTRY_POINT_TAG}` = '{Stage.TRAIN_CLASSIFIER}' and params.scenario = 'i'",
    )
    # A new browser's GenAI / Model training switch is on GenAI, whatever the experiment's
    # kind tag (MLflow 3.17); the links set it.
    training = "workflowType=machine_learning"
    run_ids, experiment_ids = (
        quote(json.dumps(ids))
        for ids in ([run.info.run_id for run in classifiers], [experiment_id])
    )
    with Browser(chromium, root / "profile") as browser:
        browser.open(f"{uri}/#/experiments/{experiment_id}/runs?{training}", STUDY_RUN)
        browser.click(ASSISTANT_CLOSE, timeout_s=5)
        for parent in (STUDY_RUN, SEED_RUN):
            browser.click_in_row(parent)
        browser.wait_for(CLASSIFIER_RUNS[-1])
        # Double-clicking the column edge fits the Run Name column to the names.
        browser.double_click(
            '.ag-header-cell[col-id="attributes.`Run Name`"] .ag-header-cell-resize'
        )
        browser.save(IMAGES / "mlflow-experiment.png", height=640)

        compare = f"{uri}/#/compare-runs?runs={run_ids}&experiments={experiment_ids}&{training}"
        browser.open(compare, *CLASSIFIER_RUNS)
        browser.click(ASSISTANT_CLOSE, timeout_s=1)
        for section in ("Visualizations", "Parameters"):  # folded: the metrics come up
            browser.click('div[role="button"]', timeout_s=5, text=section)
        browser.click('[aria-label="Metrics - Show diff only"]', timeout_s=5)
        browser.save(IMAGES / "mlflow-compare.png")


class Browser:
    """One page of headless Chromium, driven over the DevTools protocol on a pipe: the browser
    reads JSON commands on its fd 3 and writes answers and events on its fd 4, each ended by a
    NUL byte."""

    def __init__(self, chromium: str, profile: Path) -> None:
        command_read, self._commands = os.pipe()
        self._answers, answer_write = os.pipe()

        def wire() -> None:  # in the child: the pipe ends onto fds 3 and 4, via free high fds
            ends = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (command_read, answer_write)]
            for target, fd in zip((3, 4), ends, strict=True):
                os.dup2(fd, target)

        command = [chromium, "--headless", "--remote-debugging-pipe", "--hide-scrollbars"]
        command += [f"--user-data-dir={profile}", f"--window-size={SIZE[0]},{SIZE[1]}"]
        if os.geteuid() == 0:
            command.append("--no-sandbox")  # Chromium's sandbox refuses to run as root
        self._process = subprocess.Popen(
            command, pass_fds=(3, 4), preexec_fn=wire, stderr=subprocess.DEVNULL
        )
        os.close(command_read)
        os.close(answer_write)
        self._buffer, self._next_id, self._session = b"", 0, None
        target = self._send("Target.createTarget", url="about:blank")["targetId"]
        self._session = self._send("Target.attachToTarget", targetId=target, flatten=True)[
            "sessionId"
        ]
        self._send(
            "Emulation.setDeviceMetricsOverride",
            width=SIZE[0],
            height=SIZE[1],
            deviceScaleFactor=1,
            mobile=False,
        )

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc: object) -> None:
        self._process.terminate()
        self._process.wait()
        os.close(self._commands)
        os.close(self._answers)

    def open(self, url: str, *texts: str) -> None:
        """Loads `url` (from a blank page: a new document even if only the #fragment differs)
        and waits until the page shows every one of `texts`."""
        for address in ("about:blank", url):
            self._send("Page.navigate", url=address)
        for text in texts:
            self.wait_for(text)

    def wait_for(self, text: str) -> None:
        """Waits until a link or text span shows exactly `text`."""
        shown = f"""[...document.querySelectorAll('a, span')]
            .some(e => e.textContent.trim() === {json.dumps(text)})"""
        if not self._poll(shown, timeout_s=60):
            sys.exit(f"error: the page did not show {text!r} within 60 s")

    def click(self, selector: str, timeout_s: float, text: str | None = None) -> None:
        """Clicks the first element `selector` finds (with exactly `text`, if given) once it
        is there; nothing if it is not within `timeout_s`."""
        wanted = json.dumps(text)
        find = f"""[...document.querySelectorAll({json.dumps(selector)})]
            .find(e => {wanted} === null || e.textContent.trim() === {wanted})"""
        if self._poll(f"{find} !== undefined", timeout_s):
            self._evaluate(f"{find}.click()")

    def double_click(self, selector: str) -> None:
        self._evaluate(
            f"""document.querySelector({json.dumps(selector)})
                ?.dispatchEvent(new MouseEvent('dblclick', {{bubbles: true}}))"""
        )

    def click_in_row(self, run_name: str) -> None:
        """Clicks the first button in the run table's cell that links to run `run_name`."""
        self.wait_for(run_name)
        self._evaluate(
            f"""[...document.querySelectorAll('[role="gridcell"] a')]
                .find(link => link.textContent.trim() === {json.dumps(run_name)})
                .closest('[role="gridcell"]').querySelector('button').click()"""
        )

    def _poll(self, condition: str, timeout_s: float) -> bool:
        """Whether the JavaScript `condition` became true within `timeout_s`."""
        return self._evaluate(
            f"""new Promise(resolve => {{
                const end = Date.now() + {timeout_s * 1000};
                const look = () => {{
                    try {{ if ({condition}) return resolve(true); }} catch {{}}
                    Date.now() > end ? resolve(false) : setTimeout(look, 200);
                }};
                look();
            }})"""
        )

    def save(self, path: Path, height: int = SIZE[1]) -> None:
        """Saves the top `height` pixels of the page as a PNG, once it has settled."""
        self._evaluate("new Promise(resolve => setTimeout(resolve, 1000))")
        clip = {"x": 0, "y": 0, "width": SIZE[0], "height": height, "scale": 1}
        path.write_bytes(base64.b64decode(self._send("Page.captureScreenshot", clip=clip)["data"]))

    def _evaluate(self, expression: str) -> object:
        answer = self._send(
            "Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True
        )
        return answer["result"].get("value")

    def _send(self, method: str, **params: object) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if self._session is not None:
            message["sessionId"] = self._session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        while True:  # events come in between; the answer carries the command's id
            while b"\0" not in self._buffer:
                chunk = os.read(self._answers, 1 << 16)
                if not chunk:
                    sys.exit(f"error: chromium exited during {method}")
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            answer = json.loads(raw)
            if answer.get("id") == self._next_id:
                if "error" in answer:
                    sys.exit(f"error: chromium: {method}: {answer['error']['message']}")
                return answer["result"]


if __name__ == "__main__":
    main()
