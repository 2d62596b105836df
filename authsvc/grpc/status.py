"""The one table from authsvc errors to gRPC status codes.

Unknown exceptions become a generic INTERNAL: their text may carry driver
details (or worse), so it is logged here and never sent to the caller.
"""

from __future__ import annotations

import logging

import grpc

from authsvc.core import errors

log = logging.getLogger(__name__)

STATUS: dict[type[errors.AuthsvcError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.Aborted: grpc.StatusCode.ABORTED,
}


def to_status(exc: BaseException, method: str) -> tuple[grpc.StatusCode, str]:
    for kind in type(exc).__mro__:
        code = STATUS.get(kind)
        if code is not None:
            return code, str(exc)
    log.error("unexpected error in %s", method, exc_info=exc)
    return grpc.StatusCode.INTERNAL, "internal error; the server log has details"
