"""A backend that records what it is asked to do, for tests of the core's orchestration."""

from __future__ import annotations

from collections.abc import Iterator

from pydantic import BaseModel, ConfigDict

from dschat_core.backend import Backend, JobState, JobStatus, LaunchPlan
from dschat_core.hookspecs import hookimpl


class FakeSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    queue: str = "default"


class FakeBackend(Backend):
    name = "fake"
    config_model = FakeSettings

    def __init__(self, fail_stages: tuple[str, ...] = ()) -> None:
        self.fail_stages = fail_stages
        self.submitted: list[tuple[LaunchPlan, list[str]]] = []
        self.states: dict[str, JobState] = {}
        self.cancelled: list[str] = []

    def render(self, plan: LaunchPlan, after: list[str] | None = None) -> str:
        return f"fake-run {plan.stage} nodes={plan.nodes} procs={plan.procs_per_node} out={plan.output_dir}\n"

    def submit(self, plan: LaunchPlan, after: list[str] | None = None) -> str:
        job_id = f"job-{len(self.submitted) + 1}-{plan.stage}"
        self.submitted.append((plan, list(after or [])))
        self.states[job_id] = JobState.FAILED if plan.stage in self.fail_stages else JobState.SUCCEEDED
        return job_id

    def status(self, job_id: str) -> JobStatus:
        return JobStatus(job_id, self.states.get(job_id, JobState.UNKNOWN), details={"seen": "yes"})

    def cancel(self, job_id: str) -> None:
        self.cancelled.append(job_id)

    def logs(self, job_id: str, follow: bool = False) -> Iterator[str]:
        yield f"log of {job_id}\n"
        if follow:
            yield "followed to the end\n"


class FakePlugin:
    """A plugin object registering one backend, the way an adapter's module does."""

    def __init__(self, backend: FakeBackend) -> None:
        self.backend = backend

    @hookimpl
    def register_backends(self, register) -> None:
        register(self.backend)
