"""What the student learns, as one typed and checked value: :class:`LossSettings` (torch-free).

The CLI's config (:class:`cwkd.training.config.TrainConfig`) and :class:`~cwkd.core.distiller.FeatureDistiller`
both check their loss options here, so a bad value gets the same message from either.
"""

from __future__ import annotations

from dataclasses import dataclass

from cwkd.choices import MAX_HIDDEN, AlphaChoice, Method, MgdMask, Reduction, _finite_at_least, _in_range
from cwkd.errors import ConfigError


@dataclass(frozen=True)
class LossSettings:
    """What the student learns: the feature method, its weight and pairs, and logit KD."""

    method: Method = Method.cwt
    alpha: float | AlphaChoice = 1.0
    pairs: str = "last"
    hidden: int | None = None
    reduction: Reduction = Reduction.mean
    kd_weight: float = 0.0
    kd_temperature: float = 4.0
    label_smoothing: float = 0.0
    mgd_mask: MgdMask | None = None
    mgd_ratio: float | None = None
    cwd_tau: float | None = None

    def validate(self, *, flags: bool = True) -> None:
        """Refuse weights and sizes that cannot work: the one place that checks these options.

        Messages name the CLI option (``--kd-weight``), or with ``flags=False`` the Python parameter
        (``kd_weight``), as :class:`~cwkd.core.distiller.FeatureDistiller` reports them.
        """
        def name(key: str) -> str:
            return "--" + key.replace("_", "-") if flags else key

        if isinstance(self.alpha, str) and self.alpha != AlphaChoice.auto:
            raise ConfigError(f"{name('alpha')} must be a number of at least 0, or auto; got {self.alpha!r}")
        if self.alpha != AlphaChoice.auto:
            _finite_at_least(name("alpha"), self.alpha, 0.0)
        _finite_at_least(name("kd_weight"), self.kd_weight, 0.0)
        _finite_at_least(name("kd_temperature"), self.kd_temperature, 1e-6)
        _finite_at_least(name("label_smoothing"), self.label_smoothing, 0.0)
        if self.label_smoothing >= 1:
            raise ConfigError(f"{name('label_smoothing')} must be below 1, got {self.label_smoothing}")
        if self.hidden is not None:
            _in_range(name("hidden"), self.hidden, 1, MAX_HIDDEN, " channels")
        if self.mgd_ratio is not None:
            _finite_at_least(name("mgd_ratio"), self.mgd_ratio, 0.0)
            if self.mgd_ratio >= 1:
                raise ConfigError(f"{name('mgd_ratio')} is the share masked, below 1; got {self.mgd_ratio:g}")
        if self.cwd_tau is not None:
            _finite_at_least(name("cwd_tau"), self.cwd_tau, 1e-6)
        if self.method is Method.cwd and self.alpha == AlphaChoice.auto:
            raise ConfigError(f"{name('alpha')} auto is calibrated on the L2 feature loss, and CWD's is a KL; pass "
                              f"a number (MMRazor's CWD uses 5 for segmentation logits, 10 for FPN levels)")
        if self.method is Method.cwd and Reduction(self.reduction) is Reduction.sum:
            raise ConfigError(f"{name('reduction')} sum is for the L2 feature loss; CWD's KL is averaged over "
                              "channels as the paper does: drop it")
