from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TensorChunk(_message.Message):
    __slots__ = ("name", "dtype", "shape", "total_bytes", "sha256", "offset", "data")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    total_bytes: int
    sha256: bytes
    offset: int
    data: bytes
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., total_bytes: _Optional[int] = ..., sha256: _Optional[bytes] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("layout_hash", "base_fingerprint", "num_train_examples", "agent_version", "silo_name", "instance")
    LAYOUT_HASH_FIELD_NUMBER: _ClassVar[int]
    BASE_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    NUM_TRAIN_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    SILO_NAME_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    layout_hash: str
    base_fingerprint: str
    num_train_examples: int
    agent_version: str
    silo_name: str
    instance: str
    def __init__(self, layout_hash: _Optional[str] = ..., base_fingerprint: _Optional[str] = ..., num_train_examples: _Optional[int] = ..., agent_version: _Optional[str] = ..., silo_name: _Optional[str] = ..., instance: _Optional[str] = ...) -> None: ...

class JoinReply(_message.Message):
    __slots__ = ("run_id", "silo_name", "total_rounds", "ledger_receipt")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    SILO_NAME_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    LEDGER_RECEIPT_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    silo_name: str
    total_rounds: int
    ledger_receipt: LedgerReceipt
    def __init__(self, run_id: _Optional[str] = ..., silo_name: _Optional[str] = ..., total_rounds: _Optional[int] = ..., ledger_receipt: _Optional[_Union[LedgerReceipt, _Mapping]] = ...) -> None: ...

class TaskRequest(_message.Message):
    __slots__ = ("run_id", "wait_s", "instance")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    WAIT_S_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    wait_s: float
    instance: str
    def __init__(self, run_id: _Optional[str] = ..., wait_s: _Optional[float] = ..., instance: _Optional[str] = ...) -> None: ...

class TrainInstructions(_message.Message):
    __slots__ = ("local_steps", "batch_size", "grad_accum", "learning_rate", "weight_decay", "prox_mu", "clip_norm", "seed", "retention_lambda", "retention_by_importance", "sketch_buckets", "secure_mode", "session", "personal_adapter", "skip_evaluation", "needs_signals", "silo_projection", "reanchor_lambda", "report_norms")
    LOCAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    GRAD_ACCUM_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    PROX_MU_FIELD_NUMBER: _ClassVar[int]
    CLIP_NORM_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    RETENTION_LAMBDA_FIELD_NUMBER: _ClassVar[int]
    RETENTION_BY_IMPORTANCE_FIELD_NUMBER: _ClassVar[int]
    SKETCH_BUCKETS_FIELD_NUMBER: _ClassVar[int]
    SECURE_MODE_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    PERSONAL_ADAPTER_FIELD_NUMBER: _ClassVar[int]
    SKIP_EVALUATION_FIELD_NUMBER: _ClassVar[int]
    NEEDS_SIGNALS_FIELD_NUMBER: _ClassVar[int]
    SILO_PROJECTION_FIELD_NUMBER: _ClassVar[int]
    REANCHOR_LAMBDA_FIELD_NUMBER: _ClassVar[int]
    REPORT_NORMS_FIELD_NUMBER: _ClassVar[int]
    local_steps: int
    batch_size: int
    grad_accum: int
    learning_rate: float
    weight_decay: float
    prox_mu: float
    clip_norm: float
    seed: int
    retention_lambda: float
    retention_by_importance: bool
    sketch_buckets: int
    secure_mode: str
    session: int
    personal_adapter: bool
    skip_evaluation: bool
    needs_signals: bool
    silo_projection: str
    reanchor_lambda: float
    report_norms: bool
    def __init__(self, local_steps: _Optional[int] = ..., batch_size: _Optional[int] = ..., grad_accum: _Optional[int] = ..., learning_rate: _Optional[float] = ..., weight_decay: _Optional[float] = ..., prox_mu: _Optional[float] = ..., clip_norm: _Optional[float] = ..., seed: _Optional[int] = ..., retention_lambda: _Optional[float] = ..., retention_by_importance: _Optional[bool] = ..., sketch_buckets: _Optional[int] = ..., secure_mode: _Optional[str] = ..., session: _Optional[int] = ..., personal_adapter: _Optional[bool] = ..., skip_evaluation: _Optional[bool] = ..., needs_signals: _Optional[bool] = ..., silo_projection: _Optional[str] = ..., reanchor_lambda: _Optional[float] = ..., report_norms: _Optional[bool] = ...) -> None: ...

class Task(_message.Message):
    __slots__ = ("kind", "round", "layout_hash", "deadline_unix", "train", "message", "upload", "share", "unmask", "decrypt", "check", "agree", "eval_max_examples")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[Task.Kind]
        WAIT: _ClassVar[Task.Kind]
        TRAIN: _ClassVar[Task.Kind]
        EVALUATE: _ClassVar[Task.Kind]
        DONE: _ClassVar[Task.Kind]
        UPLOAD: _ClassVar[Task.Kind]
        SHARE: _ClassVar[Task.Kind]
        UNMASK: _ClassVar[Task.Kind]
        DECRYPT: _ClassVar[Task.Kind]
        JOIN: _ClassVar[Task.Kind]
        SKETCH: _ClassVar[Task.Kind]
        CHECK: _ClassVar[Task.Kind]
        AGREE: _ClassVar[Task.Kind]
    KIND_UNSPECIFIED: Task.Kind
    WAIT: Task.Kind
    TRAIN: Task.Kind
    EVALUATE: Task.Kind
    DONE: Task.Kind
    UPLOAD: Task.Kind
    SHARE: Task.Kind
    UNMASK: Task.Kind
    DECRYPT: Task.Kind
    JOIN: Task.Kind
    SKETCH: Task.Kind
    CHECK: Task.Kind
    AGREE: Task.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_HASH_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_FIELD_NUMBER: _ClassVar[int]
    TRAIN_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    UNMASK_FIELD_NUMBER: _ClassVar[int]
    DECRYPT_FIELD_NUMBER: _ClassVar[int]
    CHECK_FIELD_NUMBER: _ClassVar[int]
    AGREE_FIELD_NUMBER: _ClassVar[int]
    EVAL_MAX_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    kind: Task.Kind
    round: int
    layout_hash: str
    deadline_unix: float
    train: TrainInstructions
    message: str
    upload: UploadInstructions
    share: ShareInstructions
    unmask: UnmaskInstructions
    decrypt: DecryptInstructions
    check: CheckInstructions
    agree: AgreeInstructions
    eval_max_examples: int
    def __init__(self, kind: _Optional[_Union[Task.Kind, str]] = ..., round: _Optional[int] = ..., layout_hash: _Optional[str] = ..., deadline_unix: _Optional[float] = ..., train: _Optional[_Union[TrainInstructions, _Mapping]] = ..., message: _Optional[str] = ..., upload: _Optional[_Union[UploadInstructions, _Mapping]] = ..., share: _Optional[_Union[ShareInstructions, _Mapping]] = ..., unmask: _Optional[_Union[UnmaskInstructions, _Mapping]] = ..., decrypt: _Optional[_Union[DecryptInstructions, _Mapping]] = ..., check: _Optional[_Union[CheckInstructions, _Mapping]] = ..., agree: _Optional[_Union[AgreeInstructions, _Mapping]] = ..., eval_max_examples: _Optional[int] = ...) -> None: ...

class UploadInstructions(_message.Message):
    __slots__ = ("units", "coefficients", "peers", "groups", "fixed_point_bits", "fixed_point_frac_bits", "shares", "run_secret", "ckks_secret_context", "peer_coefficients", "stage", "sketch_buckets")
    UNITS_FIELD_NUMBER: _ClassVar[int]
    COEFFICIENTS_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    FIXED_POINT_BITS_FIELD_NUMBER: _ClassVar[int]
    FIXED_POINT_FRAC_BITS_FIELD_NUMBER: _ClassVar[int]
    SHARES_FIELD_NUMBER: _ClassVar[int]
    RUN_SECRET_FIELD_NUMBER: _ClassVar[int]
    CKKS_SECRET_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    PEER_COEFFICIENTS_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    SKETCH_BUCKETS_FIELD_NUMBER: _ClassVar[int]
    units: _containers.RepeatedScalarFieldContainer[str]
    coefficients: _containers.RepeatedScalarFieldContainer[float]
    peers: _containers.RepeatedScalarFieldContainer[str]
    groups: _containers.RepeatedScalarFieldContainer[int]
    fixed_point_bits: int
    fixed_point_frac_bits: int
    shares: _containers.RepeatedCompositeFieldContainer[SealedShare]
    run_secret: SealedShare
    ckks_secret_context: bytes
    peer_coefficients: _containers.RepeatedScalarFieldContainer[float]
    stage: str
    sketch_buckets: int
    def __init__(self, units: _Optional[_Iterable[str]] = ..., coefficients: _Optional[_Iterable[float]] = ..., peers: _Optional[_Iterable[str]] = ..., groups: _Optional[_Iterable[int]] = ..., fixed_point_bits: _Optional[int] = ..., fixed_point_frac_bits: _Optional[int] = ..., shares: _Optional[_Iterable[_Union[SealedShare, _Mapping]]] = ..., run_secret: _Optional[_Union[SealedShare, _Mapping]] = ..., ckks_secret_context: _Optional[bytes] = ..., peer_coefficients: _Optional[_Iterable[float]] = ..., stage: _Optional[str] = ..., sketch_buckets: _Optional[int] = ...) -> None: ...

class KeyAdvert(_message.Message):
    __slots__ = ("silo", "session", "mask_public", "channel_public", "signature", "certificate_pem", "secret_digest", "sketch_mask_public")
    SILO_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    MASK_PUBLIC_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_PUBLIC_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_PEM_FIELD_NUMBER: _ClassVar[int]
    SECRET_DIGEST_FIELD_NUMBER: _ClassVar[int]
    SKETCH_MASK_PUBLIC_FIELD_NUMBER: _ClassVar[int]
    silo: str
    session: int
    mask_public: bytes
    channel_public: bytes
    signature: bytes
    certificate_pem: bytes
    secret_digest: bytes
    sketch_mask_public: bytes
    def __init__(self, silo: _Optional[str] = ..., session: _Optional[int] = ..., mask_public: _Optional[bytes] = ..., channel_public: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., certificate_pem: _Optional[bytes] = ..., secret_digest: _Optional[bytes] = ..., sketch_mask_public: _Optional[bytes] = ...) -> None: ...

class ShareInstructions(_message.Message):
    __slots__ = ("adverts", "threshold", "min_group_size", "dealer", "secret_recipients", "want_ckks_context")
    ADVERTS_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    MIN_GROUP_SIZE_FIELD_NUMBER: _ClassVar[int]
    DEALER_FIELD_NUMBER: _ClassVar[int]
    SECRET_RECIPIENTS_FIELD_NUMBER: _ClassVar[int]
    WANT_CKKS_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    adverts: _containers.RepeatedCompositeFieldContainer[KeyAdvert]
    threshold: int
    min_group_size: int
    dealer: str
    secret_recipients: _containers.RepeatedScalarFieldContainer[str]
    want_ckks_context: bool
    def __init__(self, adverts: _Optional[_Iterable[_Union[KeyAdvert, _Mapping]]] = ..., threshold: _Optional[int] = ..., min_group_size: _Optional[int] = ..., dealer: _Optional[str] = ..., secret_recipients: _Optional[_Iterable[str]] = ..., want_ckks_context: _Optional[bool] = ...) -> None: ...

class SealedShare(_message.Message):
    __slots__ = ("sender", "recipient", "ciphertext")
    SENDER_FIELD_NUMBER: _ClassVar[int]
    RECIPIENT_FIELD_NUMBER: _ClassVar[int]
    CIPHERTEXT_FIELD_NUMBER: _ClassVar[int]
    sender: str
    recipient: str
    ciphertext: bytes
    def __init__(self, sender: _Optional[str] = ..., recipient: _Optional[str] = ..., ciphertext: _Optional[bytes] = ...) -> None: ...

class ShareSubmission(_message.Message):
    __slots__ = ("run_id", "round", "shares", "secrets", "ckks_public_context", "ckks_secret_context")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SHARES_FIELD_NUMBER: _ClassVar[int]
    SECRETS_FIELD_NUMBER: _ClassVar[int]
    CKKS_PUBLIC_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    CKKS_SECRET_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    round: int
    shares: _containers.RepeatedCompositeFieldContainer[SealedShare]
    secrets: _containers.RepeatedCompositeFieldContainer[SealedShare]
    ckks_public_context: bytes
    ckks_secret_context: bytes
    def __init__(self, run_id: _Optional[str] = ..., round: _Optional[int] = ..., shares: _Optional[_Iterable[_Union[SealedShare, _Mapping]]] = ..., secrets: _Optional[_Iterable[_Union[SealedShare, _Mapping]]] = ..., ckks_public_context: _Optional[bytes] = ..., ckks_secret_context: _Optional[bytes] = ...) -> None: ...

class UnmaskInstructions(_message.Message):
    __slots__ = ("survivors", "dropped", "stage", "signatures")
    SURVIVORS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    SIGNATURES_FIELD_NUMBER: _ClassVar[int]
    survivors: _containers.RepeatedScalarFieldContainer[str]
    dropped: _containers.RepeatedScalarFieldContainer[str]
    stage: str
    signatures: _containers.RepeatedCompositeFieldContainer[ViewSignature]
    def __init__(self, survivors: _Optional[_Iterable[str]] = ..., dropped: _Optional[_Iterable[str]] = ..., stage: _Optional[str] = ..., signatures: _Optional[_Iterable[_Union[ViewSignature, _Mapping]]] = ...) -> None: ...

class CheckInstructions(_message.Message):
    __slots__ = ("survivors", "dropped", "stage")
    SURVIVORS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    survivors: _containers.RepeatedScalarFieldContainer[str]
    dropped: _containers.RepeatedScalarFieldContainer[str]
    stage: str
    def __init__(self, survivors: _Optional[_Iterable[str]] = ..., dropped: _Optional[_Iterable[str]] = ..., stage: _Optional[str] = ...) -> None: ...

class ViewSignature(_message.Message):
    __slots__ = ("silo", "signature", "certificate_pem")
    SILO_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_PEM_FIELD_NUMBER: _ClassVar[int]
    silo: str
    signature: bytes
    certificate_pem: bytes
    def __init__(self, silo: _Optional[str] = ..., signature: _Optional[bytes] = ..., certificate_pem: _Optional[bytes] = ...) -> None: ...

class CheckSubmission(_message.Message):
    __slots__ = ("run_id", "round", "signature")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    round: int
    signature: ViewSignature
    def __init__(self, run_id: _Optional[str] = ..., round: _Optional[int] = ..., signature: _Optional[_Union[ViewSignature, _Mapping]] = ...) -> None: ...

class AgreeInstructions(_message.Message):
    __slots__ = ("sketch_sums",)
    SKETCH_SUMS_FIELD_NUMBER: _ClassVar[int]
    sketch_sums: _containers.RepeatedCompositeFieldContainer[TensorChunk]
    def __init__(self, sketch_sums: _Optional[_Iterable[_Union[TensorChunk, _Mapping]]] = ...) -> None: ...

class AgreementSubmission(_message.Message):
    __slots__ = ("run_id", "round", "units", "agreement")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    UNITS_FIELD_NUMBER: _ClassVar[int]
    AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    round: int
    units: _containers.RepeatedScalarFieldContainer[str]
    agreement: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, run_id: _Optional[str] = ..., round: _Optional[int] = ..., units: _Optional[_Iterable[str]] = ..., agreement: _Optional[_Iterable[float]] = ...) -> None: ...

class EncryptedSum(_message.Message):
    __slots__ = ("unit", "group", "contributors", "length", "chunk_bytes", "signed_contributions")
    UNIT_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTORS_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    SIGNED_CONTRIBUTIONS_FIELD_NUMBER: _ClassVar[int]
    unit: str
    group: int
    contributors: int
    length: int
    chunk_bytes: _containers.RepeatedScalarFieldContainer[int]
    signed_contributions: _containers.RepeatedCompositeFieldContainer[SignedContribution]
    def __init__(self, unit: _Optional[str] = ..., group: _Optional[int] = ..., contributors: _Optional[int] = ..., length: _Optional[int] = ..., chunk_bytes: _Optional[_Iterable[int]] = ..., signed_contributions: _Optional[_Iterable[_Union[SignedContribution, _Mapping]]] = ...) -> None: ...

class SignedContribution(_message.Message):
    __slots__ = ("silo", "digest", "signature", "certificate_pem")
    SILO_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_PEM_FIELD_NUMBER: _ClassVar[int]
    silo: str
    digest: bytes
    signature: bytes
    certificate_pem: bytes
    def __init__(self, silo: _Optional[str] = ..., digest: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., certificate_pem: _Optional[bytes] = ...) -> None: ...

class DecryptInstructions(_message.Message):
    __slots__ = ("sums",)
    SUMS_FIELD_NUMBER: _ClassVar[int]
    sums: _containers.RepeatedCompositeFieldContainer[EncryptedSum]
    def __init__(self, sums: _Optional[_Iterable[_Union[EncryptedSum, _Mapping]]] = ...) -> None: ...

class RevealedShare(_message.Message):
    __slots__ = ("owner", "mask_key", "share")
    OWNER_FIELD_NUMBER: _ClassVar[int]
    MASK_KEY_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    owner: str
    mask_key: bool
    share: bytes
    def __init__(self, owner: _Optional[str] = ..., mask_key: _Optional[bool] = ..., share: _Optional[bytes] = ...) -> None: ...

class UnmaskSubmission(_message.Message):
    __slots__ = ("run_id", "round", "shares")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SHARES_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    round: int
    shares: _containers.RepeatedCompositeFieldContainer[RevealedShare]
    def __init__(self, run_id: _Optional[str] = ..., round: _Optional[int] = ..., shares: _Optional[_Iterable[_Union[RevealedShare, _Mapping]]] = ...) -> None: ...

class DownloadRequest(_message.Message):
    __slots__ = ("run_id", "round", "layout_hash", "encrypted_sums")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_HASH_FIELD_NUMBER: _ClassVar[int]
    ENCRYPTED_SUMS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    round: int
    layout_hash: str
    encrypted_sums: bool
    def __init__(self, run_id: _Optional[str] = ..., round: _Optional[int] = ..., layout_hash: _Optional[str] = ..., encrypted_sums: _Optional[bool] = ...) -> None: ...

class DomainLoss(_message.Message):
    __slots__ = ("domain", "loss_sum", "tokens")
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    LOSS_SUM_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    domain: str
    loss_sum: float
    tokens: int
    def __init__(self, domain: _Optional[str] = ..., loss_sum: _Optional[float] = ..., tokens: _Optional[int] = ...) -> None: ...

class Evaluation(_message.Message):
    __slots__ = ("global_model", "local_model")
    GLOBAL_MODEL_FIELD_NUMBER: _ClassVar[int]
    LOCAL_MODEL_FIELD_NUMBER: _ClassVar[int]
    global_model: _containers.RepeatedCompositeFieldContainer[DomainLoss]
    local_model: _containers.RepeatedCompositeFieldContainer[DomainLoss]
    def __init__(self, global_model: _Optional[_Iterable[_Union[DomainLoss, _Mapping]]] = ..., local_model: _Optional[_Iterable[_Union[DomainLoss, _Mapping]]] = ...) -> None: ...

class TrainStats(_message.Message):
    __slots__ = ("steps", "tokens", "train_seconds", "train_loss_first", "train_loss_last", "num_examples", "eval_seconds", "download_seconds", "eval_examples")
    STEPS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIRST_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_LAST_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    EVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DOWNLOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    EVAL_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    steps: int
    tokens: int
    train_seconds: float
    train_loss_first: float
    train_loss_last: float
    num_examples: int
    eval_seconds: float
    download_seconds: float
    eval_examples: int
    def __init__(self, steps: _Optional[int] = ..., tokens: _Optional[int] = ..., train_seconds: _Optional[float] = ..., train_loss_first: _Optional[float] = ..., train_loss_last: _Optional[float] = ..., num_examples: _Optional[int] = ..., eval_seconds: _Optional[float] = ..., download_seconds: _Optional[float] = ..., eval_examples: _Optional[int] = ...) -> None: ...

class RoundReport(_message.Message):
    __slots__ = ("run_id", "round", "layout_hash", "num_examples", "reliability", "units", "routing_share", "sketches", "stats", "evaluation", "advert", "unit_norm", "privacy")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_HASH_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    RELIABILITY_FIELD_NUMBER: _ClassVar[int]
    UNITS_FIELD_NUMBER: _ClassVar[int]
    ROUTING_SHARE_FIELD_NUMBER: _ClassVar[int]
    SKETCHES_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    EVALUATION_FIELD_NUMBER: _ClassVar[int]
    ADVERT_FIELD_NUMBER: _ClassVar[int]
    UNIT_NORM_FIELD_NUMBER: _ClassVar[int]
    PRIVACY_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    round: int
    layout_hash: str
    num_examples: float
    reliability: float
    units: _containers.RepeatedScalarFieldContainer[str]
    routing_share: _containers.RepeatedScalarFieldContainer[float]
    sketches: _containers.RepeatedCompositeFieldContainer[TensorChunk]
    stats: TrainStats
    evaluation: Evaluation
    advert: KeyAdvert
    unit_norm: _containers.RepeatedScalarFieldContainer[float]
    privacy: PrivacySpent
    def __init__(self, run_id: _Optional[str] = ..., round: _Optional[int] = ..., layout_hash: _Optional[str] = ..., num_examples: _Optional[float] = ..., reliability: _Optional[float] = ..., units: _Optional[_Iterable[str]] = ..., routing_share: _Optional[_Iterable[float]] = ..., sketches: _Optional[_Iterable[_Union[TensorChunk, _Mapping]]] = ..., stats: _Optional[_Union[TrainStats, _Mapping]] = ..., evaluation: _Optional[_Union[Evaluation, _Mapping]] = ..., advert: _Optional[_Union[KeyAdvert, _Mapping]] = ..., unit_norm: _Optional[_Iterable[float]] = ..., privacy: _Optional[_Union[PrivacySpent, _Mapping]] = ...) -> None: ...

class PrivacySpent(_message.Message):
    __slots__ = ("epsilon", "epsilon_budget", "delta")
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    EPSILON_BUDGET_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    epsilon: float
    epsilon_budget: float
    delta: float
    def __init__(self, epsilon: _Optional[float] = ..., epsilon_budget: _Optional[float] = ..., delta: _Optional[float] = ...) -> None: ...

class UpdateHeader(_message.Message):
    __slots__ = ("run_id", "round", "layout_hash", "units", "sizes", "secure_seconds", "payload_sha256", "resume_chunks", "ledger", "contributions", "stage")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_HASH_FIELD_NUMBER: _ClassVar[int]
    UNITS_FIELD_NUMBER: _ClassVar[int]
    SIZES_FIELD_NUMBER: _ClassVar[int]
    SECURE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_SHA256_FIELD_NUMBER: _ClassVar[int]
    RESUME_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    LEDGER_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTIONS_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    round: int
    layout_hash: str
    units: _containers.RepeatedScalarFieldContainer[str]
    sizes: _containers.RepeatedScalarFieldContainer[int]
    secure_seconds: float
    payload_sha256: bytes
    resume_chunks: int
    ledger: LedgerReceipt
    contributions: _containers.RepeatedCompositeFieldContainer[SignedContribution]
    stage: str
    def __init__(self, run_id: _Optional[str] = ..., round: _Optional[int] = ..., layout_hash: _Optional[str] = ..., units: _Optional[_Iterable[str]] = ..., sizes: _Optional[_Iterable[int]] = ..., secure_seconds: _Optional[float] = ..., payload_sha256: _Optional[bytes] = ..., resume_chunks: _Optional[int] = ..., ledger: _Optional[_Union[LedgerReceipt, _Mapping]] = ..., contributions: _Optional[_Iterable[_Union[SignedContribution, _Mapping]]] = ..., stage: _Optional[str] = ...) -> None: ...

class LedgerReceipt(_message.Message):
    __slots__ = ("silo", "run_id", "round", "length", "head_hash", "signature")
    SILO_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    HEAD_HASH_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    silo: str
    run_id: str
    round: int
    length: int
    head_hash: str
    signature: bytes
    def __init__(self, silo: _Optional[str] = ..., run_id: _Optional[str] = ..., round: _Optional[int] = ..., length: _Optional[int] = ..., head_hash: _Optional[str] = ..., signature: _Optional[bytes] = ...) -> None: ...

class UploadProgress(_message.Message):
    __slots__ = ("chunks", "bytes")
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    chunks: int
    bytes: int
    def __init__(self, chunks: _Optional[int] = ..., bytes: _Optional[int] = ...) -> None: ...

class UpdateMessage(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: UpdateHeader
    chunk: TensorChunk
    def __init__(self, header: _Optional[_Union[UpdateHeader, _Mapping]] = ..., chunk: _Optional[_Union[TensorChunk, _Mapping]] = ...) -> None: ...

class SubmitReply(_message.Message):
    __slots__ = ("accepted", "message", "bytes_received")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    message: str
    bytes_received: int
    def __init__(self, accepted: _Optional[bool] = ..., message: _Optional[str] = ..., bytes_received: _Optional[int] = ...) -> None: ...

class EvalReport(_message.Message):
    __slots__ = ("run_id", "round", "layout_hash", "evaluation")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_HASH_FIELD_NUMBER: _ClassVar[int]
    EVALUATION_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    round: int
    layout_hash: str
    evaluation: Evaluation
    def __init__(self, run_id: _Optional[str] = ..., round: _Optional[int] = ..., layout_hash: _Optional[str] = ..., evaluation: _Optional[_Union[Evaluation, _Mapping]] = ...) -> None: ...

class DeclineRequest(_message.Message):
    __slots__ = ("run_id", "round", "reason")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    round: int
    reason: str
    def __init__(self, run_id: _Optional[str] = ..., round: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("message",)
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    message: str
    def __init__(self, message: _Optional[str] = ...) -> None: ...
