"""Prometheus metrics of the server, in a registry of their own (one per app, so tests can run several)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Seconds: TTFT spans prefill and queueing; inter-token latency is one decoding step.
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class Metrics:
    """Requests running and waiting (generation, and the task worker's), the task worker's batches, TTFT,
    inter-token latency, token totals, requests by outcome."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.running = Gauge("hanlm_requests_running", "Sequences being decoded", registry=r)
        self.waiting = Gauge("hanlm_requests_waiting", "Requests waiting for a decoding slot", registry=r)
        self.ttft = Histogram("hanlm_time_to_first_token_seconds", "From arrival to the first generated token",
                              buckets=_TTFT_BUCKETS, registry=r)
        self.itl = Histogram("hanlm_inter_token_latency_seconds", "Between consecutive tokens of one sequence",
                             buckets=_ITL_BUCKETS, registry=r)
        self.prompt_tokens = Counter("hanlm_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.prefix_tokens = Counter("hanlm_prefix_cached_tokens", "Prompt tokens taken from the prefix cache, not "
                                     "prefilled again", registry=r)
        self.compile_seconds = Gauge("hanlm_compile_seconds", "Seconds spent compiling the decoding step at start "
                                     "(generate.compile)", registry=r)
        self.generation_tokens = Counter("hanlm_generation_tokens", "Tokens generated", registry=r)
        self.requests = Counter("hanlm_requests", "HTTP requests to the API by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.draft_tokens = Counter("hanlm_draft_tokens", "Tokens drafted for speculative decoding", registry=r)
        self.draft_accepted = Counter("hanlm_draft_accepted_tokens", "Drafted tokens the model kept", registry=r)
        self.draft_seconds = Counter("hanlm_draft_seconds", "Seconds spent drafting", registry=r)
        self.cancelled = Counter("hanlm_sequences_cancelled", "Sequences dropped because the client went away",
                                 registry=r)
        self.task_waiting = Gauge("hanlm_task_requests_waiting",
                                  "/v1/classify, /v1/segment and /v1/ner requests waiting for the task worker",
                                  registry=r)
        self.task_running = Gauge("hanlm_task_requests_running",
                                  "Requests in the batch the task worker runs (0 when idle)", registry=r)
        self.task_batches = Counter("hanlm_task_batches", "Batches the task worker ran through the model (each "
                                    "of one request or of several joined)", registry=r)
        self.task_batched_requests = Counter("hanlm_task_batched_requests", "Requests answered from those "
                                             "batches: over hanlm_task_batches_total, the requests per batch",
                                             registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
