"""What every secure-aggregation mode does on the aggregator (docs/protocol.md): relay and deal.

One attempt of one round. Reports carry signed key adverts, which the aggregator checks against its
CA (to refuse garbage early; the silos check again against their own) and relays in the SHARE task.
The run secret — from which silo-only keys derive: the sketch key, the key that seals the CKKS
secret key — is dealt by one silo to those that lack it, sealed under pairwise keys the aggregator
cannot compute; the aggregator only stores and forwards. Mode-specific work (masks, ciphertexts)
lives in the subclasses :class:`~aggregator.masked_round.MaskedRound` and
:class:`~aggregator.ckks_round.CkksRound`.
"""

from __future__ import annotations

from collections.abc import Mapping

from aggregator.accumulate import Coefficients, floor_coefficients, regroup
from aggregator.round_mode import RoundMode
from crypto.key_agreement import NONCE_BYTES, TAG_BYTES, AdvertError, verify_advert
from crypto.secagg import RUN_SECRET_BYTES, advert_of, cells
from fcmoe.config import SecureAggregationConfig
from fcmoe.errors import ProtocolError
from fcmoe.timing import timed
from protos import fcmoe_pb2 as pb

SEALED_SECRET_BYTES = NONCE_BYTES + RUN_SECRET_BYTES + TAG_BYTES


def bad_input(message: str) -> ProtocolError:
    return ProtocolError(message, "INVALID_ARGUMENT")


class SecureRound(RoundMode):
    """Adverts, dealing of the run secret, and the plan of who uploads in which group."""

    has_sharing = True

    def __init__(self, run_id: str, session: int, unit_sizes: Mapping[str, int], settings: SecureAggregationConfig,
                 min_group_size: int, ca_pem: bytes):
        self.run_id, self.session = run_id, session
        self.unit_sizes = dict(unit_sizes)
        self.settings = settings
        self.min_group_size = min_group_size
        self._ca = ca_pem
        self._adverts: dict[str, pb.KeyAdvert] = {}
        self.reporters: list[str] = []
        self.dealer, self._secret_recipients = "", []
        self._secrets: dict[str, pb.SealedShare] = {}  # recipient -> run secret sealed by the dealer
        self.peers: list[str] = []  # who sent its SHARE answer and may upload
        self.plan: Coefficients | None = None
        self._members: set[str] = set()  # whose upload was added
        self.seconds = 0.0  # in secure-aggregation work this attempt (fcmoe.timing.timed)

    # -- TRAINING: adverts ride on the reports -------------------------------------------------
    @timed
    def check_advert(self, silo: str, advert: pb.KeyAdvert) -> None:
        """Refuse early what peers would refuse anyway: an advert not signed by ``silo`` for this attempt."""
        if advert.silo != silo or advert.session != self.session:
            raise bad_input(f"key advert is for silo {advert.silo!r} session {advert.session}, "
                            f"expected {silo!r} session {self.session}")
        try:
            verify_advert(advert_of(advert, self.run_id), bytes(advert.certificate_pem), self._ca, self.run_id,
                          self.session)
        except AdvertError as exc:
            raise bad_input(str(exc)) from None

    def keep_advert(self, silo: str, advert: pb.KeyAdvert) -> None:
        self._adverts[silo] = advert

    def take_advert(self, silo: str, report: pb.RoundReport) -> None:
        if not report.HasField("advert"):
            raise ProtocolError(f"secure aggregation ({self.mode}) needs a key advert in the report",
                                "INVALID_ARGUMENT")
        self.check_advert(silo, report.advert)
        self.keep_advert(silo, report.advert)

    def start_sharing(self, reporters: set[str], quorum: int) -> int:
        self.open_sharing(reporters)
        return quorum

    # -- SHARING -------------------------------------------------------------------------------
    def open_sharing(self, reporters: set[str], force_dealer: bool = False) -> None:
        """The run secret is dealt by the first reporter that holds one (or draws it) to those that
        lack it; ``force_dealer`` names a dealer even when nobody lacks it (it has more to send)."""
        self.reporters = sorted(reporters)
        digests = {s: bytes(self._adverts[s].secret_digest) for s in self.reporters}
        holders = [s for s in self.reporters if digests[s]]
        self.dealer = holders[0] if holders else self.reporters[0]
        self._secret_recipients = [s for s in self.reporters if s != self.dealer
                                   and (not digests[s] or digests[s] != digests[self.dealer])]
        if not self._secret_recipients and not force_dealer:
            self.dealer = ""

    def share_instructions(self) -> pb.ShareInstructions:
        return pb.ShareInstructions(adverts=[self._adverts[s] for s in self.reporters],
                                    min_group_size=self.min_group_size, dealer=self.dealer,
                                    secret_recipients=self._secret_recipients)

    def add_dealt_secrets(self, silo: str, submission: pb.ShareSubmission) -> None:
        secrets = list(submission.secrets)
        wanted = self._secret_recipients if silo == self.dealer else []
        if sorted(s.recipient for s in secrets) != sorted(wanted) or any(
                s.sender != silo or len(s.ciphertext) != SEALED_SECRET_BYTES for s in secrets):
            raise bad_input(f"run secrets: expected one sealed secret for each of {len(wanted)} recipients "
                            "from the dealer")
        self._secrets.update({s.recipient: s for s in secrets})

    # -- UPLOADING -----------------------------------------------------------------------------
    def plan_groups(self, sharers: set[str], plan: Coefficients, minimum: int) -> None:
        """Those still in the round upload; groups left below ``min_group_size`` by the others merge,
        and every coefficient is floored to ``min_weight_ratio`` of its group's largest, so that the
        silos' weight policy (crypto/secagg.py) never refuses an honest plan."""
        self.peers = sorted(sharers)
        if len(self.peers) < max(minimum, self.min_group_size):
            raise ProtocolError(f"{len(self.peers)} silos are left in the round; need {minimum}, "
                                f"min_group_size {self.min_group_size}")
        self.plan = floor_coefficients(regroup(plan, set(self.peers), self.min_group_size),
                                       self.settings.min_weight_ratio)

    def upload_instructions(self, silo: str) -> pb.UploadInstructions:
        assert self.plan is not None
        units = list(self.unit_sizes)
        return pb.UploadInstructions(units=units, coefficients=[self.plan.alpha[silo][u] for u in units],
                                     peers=self.peers, groups=cells(self.plan.group, self.peers, units),
                                     peer_coefficients=cells(self.plan.alpha, self.peers, units),
                                     run_secret=self._secrets.get(silo))

    @property
    def members(self) -> frozenset[str]:
        return frozenset(self._members)

    def check_member(self, silo: str) -> None:
        assert self.plan is not None
        if silo not in self.plan.alpha:
            raise ProtocolError(f"silo {silo!r} did not answer the share phase this round", "PERMISSION_DENIED")
        if silo in self._members:
            raise ProtocolError(f"silo {silo!r} already contributed to this round", "ALREADY_EXISTS")

    def group_members(self, silos: set[str] | frozenset[str]) -> dict[tuple[str, int], list[str]]:
        assert self.plan is not None
        out: dict[tuple[str, int], list[str]] = {}
        for silo in sorted(silos):
            for unit, group in self.plan.group[silo].items():
                out.setdefault((unit, group), []).append(silo)
        return out

    def check_group_sizes(self) -> None:
        """Nothing is revealed for a (unit, group) with fewer than ``min_group_size`` contributors."""
        for (unit, group), silos in self.group_members(self.members).items():
            if len(silos) < self.min_group_size:
                raise ProtocolError(f"unit {unit} group {group}: only {len(silos)} survivors, "
                                    f"min_group_size {self.min_group_size}; not unmasked")
