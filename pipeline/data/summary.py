"""The data summary a stage prints before training, when encoding turns records into samples.

Reading counts records and the records it drops (files.ReadReport). Encoding may make more samples
than records (KTO splits a pair into a desirable and an undesirable answer; SFT trains each answer
of some conversations in its own sample), drops samples (too long, nothing to train) and keeps some
changed (cut after the last whole turn that fits). Each count keeps its own unit, so no number of
samples is reported as records read.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.data.files import ReadReport


@dataclass
class DataSummary(ReadReport):
    """`read`/`dropped` count records; `samples` (None: one per kept record), `sample_dropped` and
    `changed` count samples."""

    record_unit: str = "records"
    sample_unit: str = "samples"
    samples: int | None = None
    sample_dropped: dict[str, int] = field(default_factory=dict)
    changed: dict[str, int] = field(default_factory=dict)

    @classmethod
    def after_reading(cls, report: ReadReport, record_unit: str, sample_unit: str) -> DataSummary:
        return cls(
            files=report.files,
            read=report.read,
            dropped=dict(report.dropped),
            record_unit=record_unit,
            sample_unit=sample_unit,
        )

    @property
    def records_kept(self) -> int:
        return self.read - sum(self.dropped.values())

    @property
    def kept(self) -> int:
        made = self.records_kept if self.samples is None else self.samples
        return made - sum(self.sample_dropped.values())

    def drop_sample(self, reason: str, n: int = 1) -> None:
        if n:
            self.sample_dropped[reason] = self.sample_dropped.get(reason, 0) + n

    def change(self, reason: str, n: int = 1) -> None:
        if n:
            self.changed[reason] = self.changed.get(reason, 0) + n

    def reasons(self) -> str:
        """Every drop, '; '-joined with its count and unit (for an error that nothing is left)."""
        drops = [(n, self.record_unit, r) for r, n in sorted(self.dropped.items())]
        drops += [(n, self.sample_unit, r) for r, n in sorted(self.sample_dropped.items())]
        return "; ".join(f"{n} {unit} dropped: {reason}" for n, unit, reason in drops)

    def summary(self, name: str) -> str:
        parts = [f"{name}: {self.files} files, {self.read} {self.record_unit} read"]
        parts += [
            f"{n} {self.record_unit} dropped ({reason})"
            for reason, n in sorted(self.dropped.items())
        ]
        if self.samples is not None and self.samples != self.records_kept:
            parts.append(
                f"{self.samples} {self.sample_unit} made from the "
                f"{self.records_kept} {self.record_unit} kept"
            )
        parts.append(f"{self.kept} {self.sample_unit} kept")
        parts += [
            f"{n} {self.sample_unit} dropped ({reason})"
            for reason, n in sorted(self.sample_dropped.items())
        ]
        parts += [f"{n} {self.sample_unit} {reason}" for reason, n in sorted(self.changed.items())]
        return ", ".join(parts)
