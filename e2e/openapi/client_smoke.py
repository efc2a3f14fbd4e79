"""A Python team's REST client, generated from /openapi.json with openapi-python-client.

Usage: client_smoke.py CLIENT_PARENT_DIR PACKAGE BASE_URL EMAIL PASSWORD
Logs in, lists users with the token, and reads the error envelope of a call
made without one. Prints a JSON summary on stdout.
"""

import importlib
import json
import sys

parent, package, base_url, email, password = sys.argv[1:]
sys.path.insert(0, parent)

client_mod = importlib.import_module(package)
login_op = importlib.import_module(f"{package}.api.auth_service.auth_service_login")
list_users_op = importlib.import_module(f"{package}.api.user_service.user_service_list_users")
login_request = importlib.import_module(f"{package}.models.otherix_v1_login_request")
error_model = importlib.import_module(f"{package}.models.error")

anon = client_mod.Client(base_url=base_url, raise_on_unexpected_status=True)
login = login_op.sync(client=anon, body=login_request.OtherixV1LoginRequest(email=email, password=password))
authed = client_mod.AuthenticatedClient(base_url=base_url, token=login.access_token)
users = list_users_op.sync(client=authed)
refused = list_users_op.sync_detailed(client=anon)
err = refused.parsed
print(
    json.dumps(
        {
            "user": login.user.username,
            "users": [u.username for u in users.users],
            "anonymous_status": int(refused.status_code),
            "anonymous_code": err.error.code if isinstance(err, error_model.Error) else None,
        }
    )
)
