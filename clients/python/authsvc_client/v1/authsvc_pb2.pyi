import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Role(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROLE_UNSPECIFIED: _ClassVar[Role]
    ROLE_MEMBER: _ClassVar[Role]
    ROLE_ADMIN: _ClassVar[Role]
    ROLE_OWNER: _ClassVar[Role]

class KeyState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KEY_STATE_UNSPECIFIED: _ClassVar[KeyState]
    KEY_STATE_ACTIVE: _ClassVar[KeyState]
    KEY_STATE_EXPIRED: _ClassVar[KeyState]
    KEY_STATE_REVOKED: _ClassVar[KeyState]

class Reason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REASON_UNSPECIFIED: _ClassVar[Reason]
    REASON_OK: _ClassVar[Reason]
    REASON_MISSING_KEY: _ClassVar[Reason]
    REASON_MALFORMED_KEY: _ClassVar[Reason]
    REASON_UNKNOWN_KEY: _ClassVar[Reason]
    REASON_REVOKED: _ClassVar[Reason]
    REASON_EXPIRED: _ClassVar[Reason]
    REASON_INSUFFICIENT_SCOPE: _ClassVar[Reason]
    REASON_RATE_LIMITED: _ClassVar[Reason]
ROLE_UNSPECIFIED: Role
ROLE_MEMBER: Role
ROLE_ADMIN: Role
ROLE_OWNER: Role
KEY_STATE_UNSPECIFIED: KeyState
KEY_STATE_ACTIVE: KeyState
KEY_STATE_EXPIRED: KeyState
KEY_STATE_REVOKED: KeyState
REASON_UNSPECIFIED: Reason
REASON_OK: Reason
REASON_MISSING_KEY: Reason
REASON_MALFORMED_KEY: Reason
REASON_UNKNOWN_KEY: Reason
REASON_REVOKED: Reason
REASON_EXPIRED: Reason
REASON_INSUFFICIENT_SCOPE: Reason
REASON_RATE_LIMITED: Reason

class Actor(_message.Message):
    __slots__ = ("user_id", "role")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    role: Role
    def __init__(self, user_id: _Optional[str] = ..., role: _Optional[_Union[Role, str]] = ...) -> None: ...

class ApiKey(_message.Message):
    __slots__ = ("id", "org_id", "name", "prefix", "scopes", "created_by", "create_time", "expire_time", "revoke_time", "revoked_by", "revoke_reason", "last_used_time", "state", "rate_limit")
    ID_FIELD_NUMBER: _ClassVar[int]
    ORG_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    SCOPES_FIELD_NUMBER: _ClassVar[int]
    CREATED_BY_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    REVOKE_TIME_FIELD_NUMBER: _ClassVar[int]
    REVOKED_BY_FIELD_NUMBER: _ClassVar[int]
    REVOKE_REASON_FIELD_NUMBER: _ClassVar[int]
    LAST_USED_TIME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    RATE_LIMIT_FIELD_NUMBER: _ClassVar[int]
    id: str
    org_id: str
    name: str
    prefix: str
    scopes: _containers.RepeatedScalarFieldContainer[str]
    created_by: str
    create_time: _timestamp_pb2.Timestamp
    expire_time: _timestamp_pb2.Timestamp
    revoke_time: _timestamp_pb2.Timestamp
    revoked_by: str
    revoke_reason: str
    last_used_time: _timestamp_pb2.Timestamp
    state: KeyState
    rate_limit: int
    def __init__(self, id: _Optional[str] = ..., org_id: _Optional[str] = ..., name: _Optional[str] = ..., prefix: _Optional[str] = ..., scopes: _Optional[_Iterable[str]] = ..., created_by: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., revoke_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., revoked_by: _Optional[str] = ..., revoke_reason: _Optional[str] = ..., last_used_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., state: _Optional[_Union[KeyState, str]] = ..., rate_limit: _Optional[int] = ...) -> None: ...

class Principal(_message.Message):
    __slots__ = ("key_id", "org_id", "user_id", "scopes", "key_prefix", "key_name")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    ORG_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    SCOPES_FIELD_NUMBER: _ClassVar[int]
    KEY_PREFIX_FIELD_NUMBER: _ClassVar[int]
    KEY_NAME_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    org_id: str
    user_id: str
    scopes: _containers.RepeatedScalarFieldContainer[str]
    key_prefix: str
    key_name: str
    def __init__(self, key_id: _Optional[str] = ..., org_id: _Optional[str] = ..., user_id: _Optional[str] = ..., scopes: _Optional[_Iterable[str]] = ..., key_prefix: _Optional[str] = ..., key_name: _Optional[str] = ...) -> None: ...

class CreateKeyRequest(_message.Message):
    __slots__ = ("org_id", "actor", "name", "scopes", "expire_time", "rate_limit")
    ORG_ID_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    SCOPES_FIELD_NUMBER: _ClassVar[int]
    EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    RATE_LIMIT_FIELD_NUMBER: _ClassVar[int]
    org_id: str
    actor: Actor
    name: str
    scopes: _containers.RepeatedScalarFieldContainer[str]
    expire_time: _timestamp_pb2.Timestamp
    rate_limit: int
    def __init__(self, org_id: _Optional[str] = ..., actor: _Optional[_Union[Actor, _Mapping]] = ..., name: _Optional[str] = ..., scopes: _Optional[_Iterable[str]] = ..., expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., rate_limit: _Optional[int] = ...) -> None: ...

class CreateKeyResponse(_message.Message):
    __slots__ = ("key", "secret")
    KEY_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    key: ApiKey
    secret: str
    def __init__(self, key: _Optional[_Union[ApiKey, _Mapping]] = ..., secret: _Optional[str] = ...) -> None: ...

class GetKeyRequest(_message.Message):
    __slots__ = ("org_id", "key_id", "actor")
    ORG_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    org_id: str
    key_id: str
    actor: Actor
    def __init__(self, org_id: _Optional[str] = ..., key_id: _Optional[str] = ..., actor: _Optional[_Union[Actor, _Mapping]] = ...) -> None: ...

class GetKeyResponse(_message.Message):
    __slots__ = ("key",)
    KEY_FIELD_NUMBER: _ClassVar[int]
    key: ApiKey
    def __init__(self, key: _Optional[_Union[ApiKey, _Mapping]] = ...) -> None: ...

class ListKeysRequest(_message.Message):
    __slots__ = ("org_id", "actor", "page", "limit", "state")
    ORG_ID_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    PAGE_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    org_id: str
    actor: Actor
    page: int
    limit: int
    state: KeyState
    def __init__(self, org_id: _Optional[str] = ..., actor: _Optional[_Union[Actor, _Mapping]] = ..., page: _Optional[int] = ..., limit: _Optional[int] = ..., state: _Optional[_Union[KeyState, str]] = ...) -> None: ...

class ListKeysResponse(_message.Message):
    __slots__ = ("data", "total", "page", "limit")
    DATA_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    PAGE_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    data: _containers.RepeatedCompositeFieldContainer[ApiKey]
    total: int
    page: int
    limit: int
    def __init__(self, data: _Optional[_Iterable[_Union[ApiKey, _Mapping]]] = ..., total: _Optional[int] = ..., page: _Optional[int] = ..., limit: _Optional[int] = ...) -> None: ...

class RevokeKeyRequest(_message.Message):
    __slots__ = ("org_id", "key_id", "actor", "reason")
    ORG_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    org_id: str
    key_id: str
    actor: Actor
    reason: str
    def __init__(self, org_id: _Optional[str] = ..., key_id: _Optional[str] = ..., actor: _Optional[_Union[Actor, _Mapping]] = ..., reason: _Optional[str] = ...) -> None: ...

class RevokeKeyResponse(_message.Message):
    __slots__ = ("key",)
    KEY_FIELD_NUMBER: _ClassVar[int]
    key: ApiKey
    def __init__(self, key: _Optional[_Union[ApiKey, _Mapping]] = ...) -> None: ...

class AuthorizeRequest(_message.Message):
    __slots__ = ("key", "required_scope")
    KEY_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_SCOPE_FIELD_NUMBER: _ClassVar[int]
    key: str
    required_scope: str
    def __init__(self, key: _Optional[str] = ..., required_scope: _Optional[str] = ...) -> None: ...

class AuthorizeResponse(_message.Message):
    __slots__ = ("allowed", "reason", "http_status", "message", "principal", "rate_limit")
    ALLOWED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    HTTP_STATUS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    RATE_LIMIT_FIELD_NUMBER: _ClassVar[int]
    allowed: bool
    reason: Reason
    http_status: int
    message: str
    principal: Principal
    rate_limit: RateLimitStatus
    def __init__(self, allowed: _Optional[bool] = ..., reason: _Optional[_Union[Reason, str]] = ..., http_status: _Optional[int] = ..., message: _Optional[str] = ..., principal: _Optional[_Union[Principal, _Mapping]] = ..., rate_limit: _Optional[_Union[RateLimitStatus, _Mapping]] = ...) -> None: ...

class RateLimitStatus(_message.Message):
    __slots__ = ("limit", "remaining", "reset_seconds")
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    REMAINING_FIELD_NUMBER: _ClassVar[int]
    RESET_SECONDS_FIELD_NUMBER: _ClassVar[int]
    limit: int
    remaining: int
    reset_seconds: int
    def __init__(self, limit: _Optional[int] = ..., remaining: _Optional[int] = ..., reset_seconds: _Optional[int] = ...) -> None: ...
