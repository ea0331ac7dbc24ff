"""A contract test kit for backends (needs pytest): what every backend must do, checked for real.

Subclass :class:`BackendContract` in your backend's tests and give it a ``backend`` fixture::

    from dschat_core.testing import BackendContract

    class TestMyBackend(BackendContract):
        plugin = my_plugin  # the module your entry point names: checked to register the backend

        @pytest.fixture
        def backend(self):
            return MyBackend()

The kit plans and renders every stage, then runs real one-rank CPU jobs through ``submit`` (with
``plan.detach``), ``status``, ``wait``, ``logs`` and ``cancel``: a preflight that must succeed with its log, a job
after a failed one that must not start, and a training job that ``cancel`` must stop. A platform whose jobs
something else runs (a Kubernetes operator) overrides :meth:`BackendContract.drive` to play that part.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from .backend import Backend, JobState, JobStatus, LaunchPlan
from .config import PIPELINES, RunConfig, load_config
from .errors import ConfigError, JobFailed
from .launch import depends_on, plan


class BackendContract:
    """The tests every backend passes. Class attributes tune them to a platform."""

    #: ``--set`` overrides the platform's tests need (its python on the nodes, a namespace, an image …).
    overrides: tuple[str, ...] = ()
    #: The plugin (the module the entry point names); when given, it must register the backend by its name.
    plugin: Any = None
    #: Seconds a job may take to reach an expected state.
    timeout: float = 600.0

    @pytest.fixture
    def backend(self) -> Backend:
        raise NotImplementedError("give the contract a `backend` fixture returning your backend")

    @pytest.fixture(autouse=True)
    def _own_job_records(self, monkeypatch, tmp_path):
        """Job records of the test's jobs stay in the test's folder."""
        monkeypatch.setenv("DSCHAT_STATE_DIR", str(tmp_path / "job-records"))

    # -- what a platform may override -------------------------------------------------------------------------
    def config(self, tmp_path: Path, *more: str) -> RunConfig:
        """A CPU run with one rank, its storage in ``tmp_path``."""
        return load_config(
            None,
            [
                f"storage.root={tmp_path}",
                "topology.accelerator=cpu",
                "topology.gpus_per_node=1",
                *self.overrides,
                *more,
            ],
        )

    def drive(self, backend: Backend, job_id: str, plan_: LaunchPlan) -> None:
        """Run the job where the platform would (the default: the platform does it by itself)."""

    # -- helpers -------------------------------------------------------------------------------------------------
    def start(self, backend: Backend, plan_: LaunchPlan, after: list[str] | None = None) -> str:
        plan_.detach = True
        job_id = backend.submit(plan_, after=after)
        self.drive(backend, job_id, plan_)
        return job_id

    def wait_for(self, backend: Backend, job_id: str, states: set[JobState]) -> JobStatus:
        deadline = time.monotonic() + self.timeout
        while True:
            status = backend.status(job_id)
            if status.state in states:
                return status
            assert time.monotonic() < deadline, f"{job_id} never reached {states}: {status.describe()}"
            time.sleep(0.2)

    @staticmethod
    def training_assets(tmp_path: Path) -> tuple[Path, Path]:
        """A tiny random OPT and the tiny task's data, written offline."""
        from .models import init_tiny
        from .tiny_task import write_sample

        return init_tiny("opt", tmp_path / "tiny-opt"), write_sample(tmp_path / "data")

    # -- the contract ---------------------------------------------------------------------------------------
    def test_has_a_name_and_validates_its_section(self, backend, tmp_path):
        assert backend.name and backend.name.replace("-", "").replace("_", "").isalnum()
        if self.plugin is not None:
            found: list[Backend] = []
            self.plugin.register_backends(register=found.append)
            assert [b.name for b in found] == [backend.name]
        bad = self.config(tmp_path, f"backends.{backend.name}.no_such_setting=1")
        with pytest.raises(ConfigError) as info:
            plan(bad, backend, "preflight")
        assert info.value.key == f"backends.{backend.name}.no_such_setting"

    def test_renders_every_stage_without_submitting(self, backend, tmp_path):
        config = self.config(
            tmp_path,
            "sft.model_name_or_path=facebook/opt-125m",
            "sft.dtype=fp32",
            "reward.model_name_or_path=facebook/opt-125m",
            "reward.dtype=fp32",
            "ppo.dtype=fp32",
            "dpo.dtype=fp32",
        )
        stages = dict.fromkeys(stage for pipeline in PIPELINES.values() for stage in pipeline)
        for stage in ("preflight", *stages):
            plan_ = plan(config, backend, stage, chained=stage != "preflight")
            after = [f"<{dep} job>" for dep in depends_on(config, stage)]
            text = backend.render(plan_, after)
            assert isinstance(text, str) and "dschat_core.worker" in text and stage in text

    def test_preflight_goes_submit_status_wait_logs(self, backend, tmp_path):
        job_id = self.start(backend, plan(self.config(tmp_path), backend, "preflight"))
        assert backend.status(job_id).state is not JobState.UNKNOWN
        final = backend.wait(job_id, poll_seconds=0.5, timeout=self.timeout)
        log = "".join(backend.logs(job_id))
        assert final.succeeded, f"{final.describe()}\n{log[-3000:]}"
        assert "world_size: 1" in log and "all_reduce: ok" in log

    def test_a_failed_dependency_refuses_to_start(self, backend, tmp_path):
        empty = tmp_path / "not-a-model"
        empty.mkdir()
        failing = plan(self.config(tmp_path, f"sft.model_name_or_path={empty}", "sft.dtype=fp32"), backend, "sft")
        failed = self.start(backend, failing)
        assert not backend.wait(failed, poll_seconds=0.5, timeout=self.timeout).succeeded
        after_it = plan(self.config(tmp_path), backend, "preflight")
        try:
            job_id = self.start(backend, after_it, after=[failed])
        except JobFailed:
            return  # refused at once
        final = backend.wait(job_id, poll_seconds=0.5, timeout=self.timeout)
        assert final.state in (JobState.FAILED, JobState.CANCELLED), final.describe()
        try:
            log = "".join(backend.logs(job_id))
        except Exception:  # no log at all: it never ran
            log = ""
        assert "world_size" not in log

    def test_cancel_stops_a_running_job(self, backend, tmp_path):
        model, data = self.training_assets(tmp_path)
        config = self.config(
            tmp_path,
            f"sft.model_name_or_path={model}",
            f"data.data_path=[{data / 'tiny-sft'}]",
            "data.data_split=1,0,0",
            "sft.dtype=fp32",
            "sft.num_train_epochs=1000",
            "sft.max_seq_len=64",
        )
        job_id = self.start(backend, plan(config, backend, "sft"))
        self.wait_for(backend, job_id, {JobState.RUNNING})
        stopper = threading.Thread(target=backend.cancel, args=(job_id,))
        stopper.start()
        final = self.wait_for(backend, job_id, {JobState.CANCELLED, JobState.FAILED, JobState.SUCCEEDED})
        stopper.join(timeout=self.timeout)
        assert final.state is JobState.CANCELLED, final.describe()
