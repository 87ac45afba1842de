"""Device enrollment routes: a certificate for a CSR, and certificate renewal.

These routes take no bearer token. Enrollment is authenticated by a one-time
enrollment token, renewal by the device's current certificate and a
signature made with its key (see ``otaflow.enrollment``).
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Depends
from pydantic import AwareDatetime, BaseModel, Field
from starlette.concurrency import run_in_threadpool

from otaflow.enrollment import (
    MAX_CSR_BYTES,
    EnrollmentAuthError,
    IssuedCertificate,
    enroll_device,
    renew_certificate,
)
from otaflow.pki import ProjectPki
from otaflow.settings import Settings
from web.deps import EngineDep, SettingsDep
from web.errors import ApiError, error_responses

logger = logging.getLogger(__name__)

router = APIRouter(
    prefix="/enrollment",
    tags=["enrollment"],
    responses=error_responses(401, 409, 422),
)

PEM_MAX_CHARS = MAX_CSR_BYTES


class EnrollmentRequest(BaseModel):
    token: str = Field(min_length=1, max_length=200, description="One-time token.")
    csr: str = Field(
        min_length=1,
        max_length=PEM_MAX_CHARS,
        description="PEM CSR whose subject CN is the device id.",
    )


class RenewalRequest(BaseModel):
    certificate: str = Field(
        min_length=1, max_length=PEM_MAX_CHARS, description="Current PEM certificate."
    )
    csr: str = Field(
        min_length=1, max_length=PEM_MAX_CHARS, description="PEM CSR of the new key."
    )
    signed_at: str = Field(
        min_length=1,
        max_length=64,
        description="RFC 3339 time of the proof, signed exactly as sent.",
    )
    proof: str = Field(
        min_length=1,
        max_length=200,
        description=(
            "base64 signature with the current key over 'otaflow-renewal-v1',"
            " signed_at and the CSR, one per line"
        ),
    )


class EnrolledDevice(BaseModel):
    device_id: str
    certificate: str = Field(description="PEM certificate of the device.")
    ca_chain: str = Field(
        description="PEM certificate of the device CA, which also signs the broker's."
    )
    serial: str
    not_after: AwareDatetime


def get_pki(settings: SettingsDep) -> ProjectPki:
    return ProjectPki(settings.resolved_pki_dir)


PkiDep = Annotated[ProjectPki, Depends(get_pki)]


@router.post("", status_code=201, summary="Enroll a device with a one-time token")
async def enroll(
    body: EnrollmentRequest, engine: EngineDep, settings: SettingsDep, pki: PkiDep
) -> EnrolledDevice:
    try:
        issued = await run_in_threadpool(
            enroll_device,
            engine,
            pki,
            token=body.token,
            csr_pem=body.csr,
            validity=_validity(settings),
        )
    except EnrollmentAuthError as error:
        logger.info("enrollment rejected: %s", error.message)
        raise ApiError(401, error.message) from None
    return _enrolled(issued)


@router.post(
    "/renew", status_code=201, summary="Renew a device certificate before it expires"
)
async def renew(
    body: RenewalRequest, engine: EngineDep, settings: SettingsDep, pki: PkiDep
) -> EnrolledDevice:
    try:
        issued = await run_in_threadpool(
            renew_certificate,
            engine,
            pki,
            certificate=body.certificate,
            csr_pem=body.csr,
            signed_at=body.signed_at,
            proof=body.proof,
            validity=_validity(settings),
        )
    except EnrollmentAuthError as error:
        logger.info("certificate renewal rejected: %s", error.message)
        raise ApiError(401, error.message) from None
    return _enrolled(issued)


def _validity(settings: Settings) -> timedelta:
    return timedelta(days=settings.device_cert_validity_days)


def _enrolled(issued: IssuedCertificate) -> EnrolledDevice:
    return EnrolledDevice(
        device_id=issued.device_id,
        certificate=issued.certificate_pem,
        ca_chain=issued.ca_chain_pem,
        serial=issued.serial,
        not_after=issued.not_after,
    )
