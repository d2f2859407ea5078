"""Run statistics. The keys of `Stats.as_dict()` are a stable interface (CLI --json, benchmarks)."""

from __future__ import annotations

from dataclasses import dataclass, field

# keys of Stats.extra that describe the setup rather than count work (the link's rate and its
# calibration, the expert format, the cache's size, the host store): a reset keeps them
SETUP_KEYS = frozenset({"link_gbps", "link_ratio", "expert_compute_us", "expert_format", "expert_bytes",
                        "cache_slots_per_layer", "host_expert_bytes", "pinned_host_bytes",
                        "linear_attention_kernels", "recurrent_state_bytes", "placement_rule",
                        "static_experts_per_layer", "static_profile_coverage"})


@dataclass
class Stats:
    prefill_tokens: int = 0
    prefill_s: float = 0.0
    decode_tokens: int = 0
    decode_s: float = 0.0
    bytes_h2d: int = 0
    expert_hits: int = 0
    expert_misses: int = 0
    stall_s: float = 0.0
    little_tokens: int = 0
    fallback_tokens: int = 0
    link: str = "none"  # none | real | emulated
    extra: dict = field(default_factory=dict)

    def reset(self) -> None:
        """Zero the counters; keep what describes the setup (SETUP_KEYS)."""
        link, keep = self.link, {k: v for k, v in self.extra.items() if k in SETUP_KEYS}
        self.__init__()  # type: ignore[misc]
        self.link, self.extra = link, keep

    def as_dict(self) -> dict:
        big_only = self.extra.get("decode_big_only_bytes_h2d")
        return {
            "prefill_tokens_per_s": self.prefill_tokens / self.prefill_s if self.prefill_s else 0.0,
            "decode_tokens_per_s": self.decode_tokens / self.decode_s if self.decode_s else 0.0,
            "prefill_tokens": self.prefill_tokens,
            "decode_tokens": self.decode_tokens,
            "bytes_h2d": self.bytes_h2d,
            "expert_hits": self.expert_hits,
            "expert_misses": self.expert_misses,
            "stall_s": self.stall_s,
            "little_tokens": self.little_tokens,
            "fallback_tokens": self.fallback_tokens,
            "fallback_rate": self.fallback_tokens / max(1, self.little_tokens + self.fallback_tokens),
            "link": self.link,
            **self.extra,
            # decode bytes moved / what big-only decoding would have moved in this run (BigOnlyShadow)
            "decode_bytes_vs_big_only": self.extra.get("decode_bytes_h2d", 0) / big_only if big_only else None,
        }
