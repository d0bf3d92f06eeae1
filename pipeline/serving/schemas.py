"""The service's API contract: Pydantic models of every response (and of the error body), from
which the OpenAPI document (:mod:`pipeline.serving.routes`, ``GET /docs.json``) takes its schemas.
The service builds its responses as plain dicts (:meth:`pipeline.serving.service.LesionflowService.finalise`);
a test checks that they validate against these models."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class ApiErrorBody(BaseModel):
    """Every 4xx/5xx answer of the service's own endpoints."""

    error: str = Field(description="what is wrong, naming the field: \"field 'age': must be ...\"")
    field: str | None = Field(None, description="the offending request field (image, image[2], age, sex, ...)")
    status: int = Field(description="the HTTP status code, repeated")


class Metadata(BaseModel):
    """The validated metadata of a request (null: not given or unknown)."""

    age: float | None = None
    sex: str | None = None
    localization: str | None = None


class WithheldProbabilities(BaseModel):
    """The model's probabilities for an image it cannot judge (out of distribution): kept for API
    clients that need them, never shown to a person as a risk estimate."""

    dx_probabilities: dict[str, float] | None
    risk_probabilities: dict[str, float] | None
    binary_probabilities: dict[str, float]
    p_malignant: float


class SimilarCase(BaseModel):
    """A confirmed training case similar to the query image."""

    image_id: str
    lesion_id: str
    dx: str
    diagnosis: str
    dx_type: str
    confirmation: str = Field(description="how the diagnosis was confirmed: histopathology, follow-up, ...")
    similarity: float = Field(description="cosine similarity of the model's embeddings (1 = identical)")
    age: float | None
    sex: str | None
    localization: str | None
    thumbnail_url: str


class Classification(BaseModel):
    """The answer for one image. When ``quality_reasons`` is not empty or ``in_distribution`` is
    false the risk estimate is withheld: the probability fields, ``refer`` and ``decision`` are
    null, ``message`` says why and the probabilities are under ``withheld_probabilities``."""

    in_distribution: bool | None = Field(description="false: the image does not look like the training images")
    ood_score: float | None = Field(description="out-of-distribution score (higher: more unusual)")
    ood_threshold: float | None = Field(description="scores above this are out of distribution")
    quality_reasons: list[str] | None = Field(
        None,
        description="image-quality checks the image failed (blank, underexposed, overexposed, out_of_focus, "
        "implausible_colour); empty: it passed; null: the model has no checks",
    )
    message: str | None = Field(
        description="why no risk estimate is given (an image-quality check, or out of distribution), or why no "
        "decision at a site not suitable for the model, else null"
    )
    dx_probabilities: dict[str, float] | None
    dx_top: str | None
    risk_class: str | None
    risk_probabilities: dict[str, float] | None
    binary_probabilities: dict[str, float] | None
    p_malignant: float | None
    site: str | None = Field(
        None, description="the site the request named (field or header `site`), whose threshold applies; else null"
    )
    threshold: float = Field(
        description="the operating threshold on p_malignant: the site's when one is named (lesionflow site add), "
        "else the model's, chosen on validation data"
    )
    refer: bool | None = Field(
        description="p_malignant >= threshold (null when withheld, or at a site not suitable for the model)"
    )
    decision: str | None
    withheld_probabilities: WithheldProbabilities | None
    similar: list[SimilarCase] | None = Field(
        None, description="with ?similar=K: the most similar confirmed training cases (empty when withheld)"
    )
    metadata: Metadata
    request_id: str = Field(
        description="this answer's id (also the X-Request-ID header): its inference-log record is erased by it"
    )
    model_tag: str
    data_version: str
    disclaimer: str


class SimilarCases(BaseModel):
    """The answer of ``/similar``: the similar confirmed cases of one image."""

    in_distribution: bool | None
    quality_reasons: list[str] | None = None
    message: str | None
    similar: list[SimilarCase]
    k: int
    request_id: str
    model_tag: str
    data_version: str
    disclaimer: str
    attribution: str


class BatchClassification(BaseModel):
    """The answers for several images, in request order."""

    results: list[Classification]
    n: int
    model_tag: str
    data_version: str
    disclaimer: str


class Health(BaseModel):
    status: Literal["ok", "loading"]
    ready: bool
    model_tag: str | None = Field(description="the served model (null while it is loading)")


class ModelInfo(BaseModel):
    """What the service serves and accepts (vocabularies, sizes, limits, threshold, OOD check)."""

    model_config = ConfigDict(extra="allow")

    model_tag: str
    data_version: str
    threshold: float
    decision_rule: str
    sites: list[dict[str, Any]] = Field(
        [], description="the sites with their own operating point: threshold, suitable or not (lesionflow site list)"
    )
    native_level: str
    classes: dict[str, list[str]]
    input_size: list[int]
    input_limits: dict[str, float]
    calibration: dict[str, Any] | None
    ood: dict[str, Any] | None
    quality: dict[str, Any] | None = Field(None, description="the image-quality checks: thresholds and reasons")
    similar_cases: dict[str, Any] | None = Field(None, description="the retrieval index: size, default k, route")
    metadata_fields: dict[str, Any]
    limits: dict[str, Any]
    disclaimer: str


class InferItem(BaseModel):
    """One preprocessed image for ``POST /infer``: the uint8 (3, H, W) tensor at the model's input
    size (:meth:`pipeline.model.inference.Predictor.resize`), base64, plus metadata."""

    pixels: str
    age: float | None = None
    sex: str | None = None
    localization: str | None = None


class InferResult(BaseModel):
    """The probabilities of one ``/infer`` item, or ``error`` for an item that is not a valid tensor."""

    model_config = ConfigDict(extra="allow")

    error: str | None = None
    dx: list[float] | None = None
    risk: list[float] | None = None
    binary: list[float] | None = None
    p_malignant: float | None = None
    in_distribution: bool | None = None
    ood_score: float | None = None


class Dispute(BaseModel):
    """A clinician's disagreement with an answer (``POST /dispute``)."""

    request_id: str = Field(description="The answer's request_id (X-Request-ID).", max_length=128)
    dx: str = Field(description="The diagnosis the clinician gives instead (a dx class).")
    note: str = Field("", description="Why, optional.", max_length=500)


class DisputeRecorded(BaseModel):
    """The disagreement was appended to the inference log."""

    recorded: bool
    request_id: str
    dx: str
