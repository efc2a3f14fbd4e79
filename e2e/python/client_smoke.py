"""A Python team's client, generated from proto/ with grpcio-tools.

Usage: client_smoke.py GENERATED_DIR HOST:PORT EMAIL PASSWORD
Logs in, creates an API token, lists users with it, and checks that a call
without credentials fails with the documented error code. Prints a JSON
summary on stdout.
"""

import json
import sys

sys.path.insert(0, sys.argv[1])

import grpc  # noqa: E402
from google.protobuf import struct_pb2  # noqa: E402
from google.rpc import error_details_pb2, status_pb2  # noqa: E402
from otherix.v1 import (  # noqa: E402
    api_token_pb2,
    api_token_pb2_grpc,
    auth_pb2,
    auth_pb2_grpc,
    cluster_pb2,
    cluster_pb2_grpc,
    user_pb2,
    user_pb2_grpc,
)


def error_code(err: grpc.RpcError) -> str:
    """The Otherix error code carried in the status details."""
    for key, value in err.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                    info = error_details_pb2.ErrorInfo()
                    detail.Unpack(info)
                    return info.reason
    return ""


def field_violations(err: grpc.RpcError) -> list:
    """The fields a google.rpc.BadRequest detail names."""
    for key, value in err.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            for detail in status_pb2.Status.FromString(value).details:
                if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                    bad = error_details_pb2.BadRequest()
                    detail.Unpack(bad)
                    return [v.field for v in bad.field_violations]
    return []


def main() -> None:
    _, _, target, email, password = sys.argv
    channel = grpc.insecure_channel(target)
    login = auth_pb2_grpc.AuthServiceStub(channel).Login(
        auth_pb2.LoginRequest(email=email, password=password)
    )
    jwt = [("authorization", f"Bearer {login.access_token}")]
    created = api_token_pb2_grpc.ApiTokenServiceStub(channel).CreateApiToken(
        api_token_pb2.CreateApiTokenRequest(user="me", name="python-client"), metadata=jwt
    )
    token = [("authorization", f"Bearer {created.plaintext_token}")]
    users = user_pb2_grpc.UserServiceStub(channel).ListUsers(user_pb2.ListUsersRequest(), metadata=token)
    try:
        cluster_pb2_grpc.ClusterServiceStub(channel).GetDefaultPool(cluster_pb2.GetDefaultPoolRequest())
        anonymous = "allowed"
    except grpc.RpcError as err:
        anonymous = f"{err.code().name}/{error_code(err)}"
    try:
        cluster_pb2_grpc.ClusterServiceStub(channel).SetDefaultPool(
            cluster_pb2.SetDefaultPoolRequest(name="Not A Label"), metadata=token
        )
        invalid = {"code": "allowed"}
    except grpc.RpcError as err:
        invalid = {"code": f"{err.code().name}/{error_code(err)}", "fields": field_violations(err)}
    _ = struct_pb2  # the Struct detail type resolves from the generated imports
    print(
        json.dumps(
            {
                "user": login.user.username,
                "role": login.user.role,
                "token_prefix": created.plaintext_token[:4],
                "token_name": created.api_token.name,
                "users": [u.username for u in users.users],
                "anonymous": anonymous,
                "invalid": invalid,
            }
        )
    )


if __name__ == "__main__":
    main()
