"""A scorer whose answer is known in closed form, for tests and benchmarks.

The probability of a token is a logistic function of which regions are visible:

    p(keep) = sigmoid(bias + sum_i w_i keep_i + sum_(i,j) u_ij keep_i keep_j)

`bias` is the language prior (the logit with every region removed), `w` the evidence each
region carries, `u` pairwise interactions (a token that needs two regions together).  It reads
only `MaskedBatch.keep`, never the pixels, so it costs microseconds per masked image.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from detectors.errors import InvalidTargetError, ScorerContractError
from detectors.scorers.masked import MaskedBatch
from detectors.types import Target, VerdictLabel

__all__ = ["CASE_NAMES", "AnalyticCase", "AnalyticScorer", "TokenResponse", "analytic_case"]


@dataclass(frozen=True, kw_only=True, slots=True, eq=False)
class TokenResponse:
    """How one token's probability responds to visible regions.

    Attributes:
        bias: logit with everything removed (the language prior).
        weights: `(R,)` logit added by each visible region.
        interactions: `(i, j, u)` triples, logit `u` added when regions i and j are both visible.
    """

    bias: float
    weights: np.ndarray
    interactions: tuple[tuple[int, int, float], ...] = ()

    def __post_init__(self) -> None:
        weights = np.asarray(self.weights, dtype=np.float64)
        if weights.ndim != 1 or weights.size < 1:
            raise ValueError(f"weights must be a non-empty 1-d array, got shape {weights.shape}")
        for i, j, _ in self.interactions:
            if not (0 <= i < weights.size and 0 <= j < weights.size and i != j):
                raise ValueError(f"interaction ({i}, {j}) is not a pair of distinct region ids")
        object.__setattr__(self, "weights", weights)

    @property
    def n_regions(self) -> int:
        return int(self.weights.size)

    def logit(self, keep: np.ndarray) -> np.ndarray:
        """`(B,)` logit for a `(B, R)` bool selection.  Row-wise sums, so a row's value never
        depends on the other rows of the batch (batch size cannot change a result)."""
        visible = keep.astype(np.float64)
        out = self.bias + (visible * self.weights).sum(axis=1)
        for i, j, u in self.interactions:
            out = out + u * (visible[:, i] * visible[:, j])
        return np.asarray(out)

    def probability(self, keep: np.ndarray) -> np.ndarray:
        """`(B,)` probability for a `(B, R)` bool selection."""
        return np.asarray(1.0 / (1.0 + np.exp(-self.logit(keep))))


class AnalyticScorer:
    """A `Scorer` backed by one `TokenResponse` per token id."""

    def __init__(
        self,
        responses: Mapping[int, TokenResponse],
        *,
        name: str = "analytic",
        max_batch_size: int = 1024,
    ) -> None:
        if not responses:
            raise ValueError("an AnalyticScorer needs at least one token response")
        sizes = {r.n_regions for r in responses.values()}
        if len(sizes) != 1:
            raise ValueError(f"all token responses must cover the same regions, got sizes {sizes}")
        self._responses = dict(responses)
        self._n_regions = sizes.pop()
        self._name = name
        self._max_batch_size = max_batch_size
        self.calls = 0

    @property
    def name(self) -> str:
        return self._name

    @property
    def max_batch_size(self) -> int:
        return self._max_batch_size

    @property
    def n_regions(self) -> int:
        return self._n_regions

    def response(self, token_id: int) -> TokenResponse:
        try:
            return self._responses[token_id]
        except KeyError:
            raise InvalidTargetError(
                f"the analytic scorer knows token ids {sorted(self._responses)}, got: {token_id}"
            ) from None

    def probabilities(self, keep: np.ndarray, targets: Sequence[Target]) -> np.ndarray:
        """`(B, T)` probabilities straight from a `(B, R)` selection (no image needed)."""
        if keep.shape[1] != self._n_regions:
            raise ScorerContractError(
                f"the analytic scorer was built for {self._n_regions} regions, "
                f"got a selection over {keep.shape[1]}"
            )
        return np.stack([self.response(t.token_id).probability(keep) for t in targets], axis=1)

    def score(self, batch: MaskedBatch, targets: Sequence[Target]) -> np.ndarray:
        self.calls += 1
        return self.probabilities(batch.keep, targets)

    @classmethod
    def random(
        cls,
        n_regions: int,
        seed: int,
        *,
        interactions: int = 0,
        token_id: int = 0,
        name: str = "analytic-random",
    ) -> AnalyticScorer:
        """A random token response: a few evidence regions, weak noise elsewhere, a random
        prior, and `interactions` random pairwise terms."""
        rng = np.random.default_rng(seed)
        weights = rng.normal(0.0, 0.3, n_regions)
        n_evidence = int(rng.integers(1, max(2, n_regions // 6) + 1))
        evidence = rng.choice(n_regions, size=n_evidence, replace=False)
        weights[evidence] += rng.uniform(1.0, 4.0, n_evidence)
        bias = float(rng.uniform(-5.0, 1.0))
        pairs: list[tuple[int, int, float]] = []
        for _ in range(interactions):
            i, j = rng.choice(n_regions, size=2, replace=False)
            pairs.append((int(i), int(j), float(rng.uniform(-2.0, 5.0))))
        response = TokenResponse(bias=bias, weights=weights, interactions=tuple(pairs))
        return cls({token_id: response}, name=name)


@dataclass(frozen=True, kw_only=True, slots=True, eq=False)
class AnalyticCase:
    """A named analytic scenario with its known answer.

    Attributes:
        name: the case's name.
        scorer: the scorer.
        targets: the tokens to explain.
        evidence: per target, the regions that carry its evidence (empty for prior-driven).
        expected: per target, the verdict a correct guardrail reaches.
        description: one sentence.
    """

    name: str
    scorer: AnalyticScorer
    targets: tuple[Target, ...]
    evidence: tuple[frozenset[int], ...]
    expected: tuple[VerdictLabel, ...]
    description: str = ""
    extra: dict[str, object] = field(default_factory=dict)


CASE_NAMES = ("grounded", "prior_driven", "conjunctive", "borrowed_evidence")


def analytic_case(name: str, n_regions: int = 16, *, seed: int = 0) -> AnalyticCase:
    """One of the named scenarios in `CASE_NAMES`, over `n_regions` regions.

    - `grounded`: the token needs a compact set of 3 regions (p_blank ~0.01, p_full ~0.99).
    - `prior_driven`: the text alone predicts it (p_blank ~0.95) and no region matters much.
    - `conjunctive`: the token needs two regions together (one pairwise interaction).
    - `borrowed_evidence`: two object tokens; the second ("fork") is not in the image but is
      triggered by the first one's ("knife") regions.
    """
    if n_regions < 8:
        raise ValueError(f"named analytic cases need at least 8 regions, got: {n_regions}")
    rng = np.random.default_rng(seed)
    noise = rng.normal(0.0, 0.05, n_regions)
    regions = rng.permutation(n_regions)
    first = Target(position=3, token_id=1, text="cat")
    if name == "grounded":
        evidence = frozenset(int(r) for r in regions[:3])
        weights = noise.copy()
        weights[list(evidence)] += 3.0
        scorer = AnalyticScorer(
            {1: TokenResponse(bias=-4.6, weights=weights)}, name="analytic-grounded"
        )
        return AnalyticCase(
            name=name,
            scorer=scorer,
            targets=(first,),
            evidence=(evidence,),
            expected=(VerdictLabel.GROUNDED,),
            description="the token is grounded in a compact set of three regions",
        )
    if name == "prior_driven":
        scorer = AnalyticScorer(
            {1: TokenResponse(bias=3.0, weights=noise * 2)}, name="analytic-prior-driven"
        )
        return AnalyticCase(
            name=name,
            scorer=scorer,
            targets=(first,),
            evidence=(frozenset(),),
            expected=(VerdictLabel.LANGUAGE_PRIOR,),
            description="the text alone predicts the token; no region is necessary",
        )
    if name == "conjunctive":
        i, j = (int(r) for r in regions[:2])
        scorer = AnalyticScorer(
            {
                1: TokenResponse(
                    bias=-5.0,
                    weights=noise + np.where(np.isin(np.arange(n_regions), [i, j]), 0.5, 0.0),
                    interactions=((i, j, 10.0),),
                )
            },
            name="analytic-conjunctive",
        )
        return AnalyticCase(
            name=name,
            scorer=scorer,
            targets=(first,),
            evidence=(frozenset({i, j}),),
            expected=(VerdictLabel.GROUNDED,),
            description="the token needs two regions together",
        )
    if name == "borrowed_evidence":
        knife = frozenset(int(r) for r in regions[:2])
        w_knife = noise.copy()
        w_knife[list(knife)] += 4.5
        w_fork = rng.normal(0.0, 0.05, n_regions)
        w_fork[list(knife)] += 4.0
        scorer = AnalyticScorer(
            {
                1: TokenResponse(bias=-4.6, weights=w_knife),
                2: TokenResponse(bias=-4.0, weights=w_fork),
            },
            name="analytic-borrowed-evidence",
        )
        knife_t = Target(position=3, token_id=1, text="knife")
        fork_t = Target(position=6, token_id=2, text="fork")
        return AnalyticCase(
            name=name,
            scorer=scorer,
            targets=(knife_t, fork_t),
            evidence=(knife, knife),
            expected=(VerdictLabel.GROUNDED, VerdictLabel.BORROWED_EVIDENCE),
            description="'fork' is absent; its probability rests on the knife's regions",
        )
    raise ValueError(f"unknown analytic case {name!r}; expected one of {CASE_NAMES}")
