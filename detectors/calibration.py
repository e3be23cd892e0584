"""Verdict thresholds with the settings they were fitted under.

The thresholds of `PriorThresholds` are only right for the settings they were calibrated with:
the same model under black fill instead of mean fill left a third of the present words
`undetermined` with the mean-fill thresholds.  A `Calibration` keeps the thresholds together
with what they depend on (fill, partition method, region count, search budget), the model's
fingerprint and the scenes they were fitted on; `CalibrationSet.for_settings` hands out the
thresholds for the settings an audit runs with, or refuses with `CalibrationMismatchError`,
which names what differs and how to calibrate for it.  A model directory keeps its set in
`thresholds.json`.

File format (`"format": 2`)::

    {"format": 2, "calibrations": [
        {"thresholds": {...}, "settings": {"fill": "mean", "partition": "slic",
         "n_regions": 48, "budget_fraction": 0.1, "max_forward_passes": null},
         "model_sha256": "...", "fitted_on": {"split": "validation", "seed": 1, ...}}]}

A file of the first format (`{"thresholds": ..., "calibrated_on": ...}`) was fitted with the
defaults of that time: mean fill, SLIC, 48 regions, a tenth of the exact search's budget.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from detectors.errors import DetectorError
from detectors.language_prior import PriorThresholds
from detectors.pipeline import AuditSettings
from detectors.types import DEFAULT_BUDGET_FRACTION, DEFAULT_N_REGIONS, Fill

__all__ = [
    "THRESHOLDS_FILE",
    "Calibration",
    "CalibrationMismatchError",
    "CalibrationSet",
    "CalibrationSettings",
    "load_calibration",
]

THRESHOLDS_FILE = "thresholds.json"  # a model directory's calibrations

FORMAT = 2


class CalibrationMismatchError(DetectorError, ValueError):
    """The thresholds available were calibrated under other settings than the audit's."""


@dataclass(frozen=True, kw_only=True, slots=True)
class CalibrationSettings:
    """What a verdict's thresholds depend on."""

    fill: Fill
    partition: str = "slic"
    n_regions: int = DEFAULT_N_REGIONS
    budget_fraction: float | None = DEFAULT_BUDGET_FRACTION
    max_forward_passes: int | None = None

    @classmethod
    def of(cls, settings: AuditSettings, *, partition: str = "slic") -> CalibrationSettings:
        """The calibration-relevant part of an audit's settings."""
        return cls(
            fill=Fill(settings.fill),
            partition=partition,
            n_regions=settings.n_regions,
            budget_fraction=None if settings.max_forward_passes else settings.budget_fraction,
            max_forward_passes=settings.max_forward_passes,
        )

    def differences(self, other: CalibrationSettings) -> list[str]:
        """`name: mine != other` for each setting that differs (budget fractions equal to
        1e-9)."""
        out = []
        for name in ("fill", "partition", "n_regions", "budget_fraction", "max_forward_passes"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if isinstance(mine, float) and isinstance(theirs, float):
                if abs(mine - theirs) <= 1e-9:
                    continue
            elif mine == theirs:
                continue
            out.append(f"{name} {_show(mine)} (calibrated: {_show(theirs)})")
        return out

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["fill"] = self.fill.value
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CalibrationSettings:
        return cls(
            fill=Fill(data["fill"]),
            partition=str(data.get("partition", "slic")),
            n_regions=int(data["n_regions"]),
            budget_fraction=None
            if data.get("budget_fraction") is None
            else float(data["budget_fraction"]),
            max_forward_passes=None
            if data.get("max_forward_passes") is None
            else int(data["max_forward_passes"]),
        )

    def flags(self) -> str:
        """The `guardrail reference calibrate` options that calibrate for these settings."""
        budget = (
            f"--passes {self.max_forward_passes}"
            if self.max_forward_passes is not None
            else f"--budget {self.budget_fraction}"
        )
        return f"--fill {self.fill.value} --regions {self.n_regions} {budget}"


def _show(value: object) -> str:
    return value.value if isinstance(value, Fill) else repr(value)


@dataclass(frozen=True, kw_only=True, slots=True)
class Calibration:
    """Thresholds, the settings they were fitted under, the model and the scenes."""

    thresholds: PriorThresholds
    settings: CalibrationSettings
    model_sha256: str | None = None
    fitted_on: Mapping[str, Any] = field(default_factory=dict)

    @property
    def calibrated(self) -> bool:
        return bool(self.fitted_on)

    @property
    def id(self) -> str:
        """A short fingerprint of these thresholds with what they were fitted under (settings,
        model, scenes): equal ids mean the same calibration.  Stored with every verdict."""
        canonical = json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":"))
        return "cal-" + hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def provenance(self) -> dict[str, Any]:
        """What a stored verdict records about the thresholds it was decided with."""
        return {
            "thresholds": asdict(self.thresholds),
            "calibration": self.settings.as_dict() if self.calibrated else None,
            "model_sha256": self.model_sha256,
            "fitted_on": dict(self.fitted_on) or None,
        }

    def as_dict(self) -> dict[str, Any]:
        return {
            "thresholds": asdict(self.thresholds),
            "settings": self.settings.as_dict(),
            "model_sha256": self.model_sha256,
            "fitted_on": dict(self.fitted_on),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Calibration:
        return cls(
            thresholds=PriorThresholds(**data["thresholds"]),
            settings=CalibrationSettings.from_dict(data["settings"]),
            model_sha256=data.get("model_sha256"),
            fitted_on=dict(data.get("fitted_on") or {}),
        )


@dataclass(frozen=True, slots=True)
class CalibrationSet:
    """The calibrations of one model, at most one per settings."""

    calibrations: tuple[Calibration, ...] = ()

    def for_settings(
        self,
        settings: CalibrationSettings,
        *,
        model_sha256: str | None = None,
        strict: bool = True,
    ) -> Calibration:
        """The calibration fitted under `settings`.  With no calibration at all, the default
        thresholds, marked uncalibrated.  With `strict` off, settings no calibration was fitted
        under get the nearest calibration (the same fill first); its provenance says which.

        Raises:
            CalibrationMismatchError: calibrations exist but none under `settings`, or the
                matching one was fitted on other weights (`model_sha256` given and different).
        """
        if not self.calibrations:
            return Calibration(thresholds=PriorThresholds(), settings=settings)
        for calibration in self.calibrations:
            if not settings.differences(calibration.settings):
                if (
                    model_sha256 is not None
                    and calibration.model_sha256 is not None
                    and calibration.model_sha256 != model_sha256
                ):
                    raise CalibrationMismatchError(
                        f"the thresholds were calibrated on other weights (sha256 "
                        f"{calibration.model_sha256[:12]}, this model {model_sha256[:12]}): "
                        f"recalibrate with `guardrail reference calibrate {settings.flags()}`"
                    )
                return calibration
        nearest = min(
            self.calibrations,
            key=lambda c: (c.settings.fill != settings.fill, len(settings.differences(c.settings))),
        )
        if not strict:
            return nearest
        raise CalibrationMismatchError(
            "the verdict thresholds were not calibrated for these audit settings: "
            + "; ".join(settings.differences(nearest.settings))
            + ". Audit with the calibrated settings, or calibrate for these with "
            f"`guardrail reference calibrate {settings.flags()}`"
        )

    def with_calibration(self, calibration: Calibration) -> CalibrationSet:
        """This set with `calibration` added, replacing one fitted under the same settings."""
        kept = tuple(c for c in self.calibrations if calibration.settings.differences(c.settings))
        return CalibrationSet((*kept, calibration))

    @classmethod
    def load(cls, path: Path) -> CalibrationSet:
        """The set stored at `path` (empty when there is no file)."""
        if not path.is_file():
            return cls()
        data = json.loads(path.read_text())
        if "calibrations" in data:
            if data.get("format") != FORMAT:
                raise ValueError(f"{path}: unknown thresholds format {data.get('format')!r}")
            return cls(tuple(Calibration.from_dict(c) for c in data["calibrations"]))
        # the first format: fitted with the defaults of its time
        return cls(
            (
                Calibration(
                    thresholds=PriorThresholds(**data["thresholds"]),
                    settings=CalibrationSettings(fill=Fill.MEAN),
                    model_sha256=data.get("sha256"),
                    fitted_on=dict(data.get("calibrated_on") or {}),
                ),
            )
        )

    def save(self, path: Path) -> None:
        record = {"format": FORMAT, "calibrations": [c.as_dict() for c in self.calibrations]}
        path.write_text(json.dumps(record, indent=2) + "\n")


def load_calibration(
    model_dir: Path,
    settings: AuditSettings | None = None,
    *,
    model_sha256: str | None = None,
    strict: bool = True,
) -> Calibration:
    """The thresholds calibrated for the model in `model_dir` under `settings` (default:
    `AuditSettings()`), with their provenance; the default thresholds, marked uncalibrated, when
    the model was never calibrated.  `model_sha256`, when given, must be the weights' the
    thresholds were fitted on; `strict` off takes the nearest calibration instead of refusing.

    Raises:
        CalibrationMismatchError: the model was calibrated, but not under these settings (or
            not with these weights); the message says how to calibrate for them.
    """
    calibrations = CalibrationSet.load(Path(model_dir) / THRESHOLDS_FILE)
    wanted = CalibrationSettings.of(settings or AuditSettings())
    return calibrations.for_settings(wanted, model_sha256=model_sha256, strict=strict)
