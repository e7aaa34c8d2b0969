"""The real snowflake-connector-python logging in with a workload-identity token from a
`--out-dir` connections.toml entry, against a stand-in of Snowflake's login endpoint.

No Snowflake can run here (PEERS.md), so this stand-in follows the request the installed
connector sends (snowflake/connector/auth/workload_identity.py: POST
/session/v1/login-request with data.AUTHENTICATOR = WORKLOAD_IDENTITY, data.PROVIDER = OIDC,
data.TOKEN) and Snowflake's documented response ({"data": {"token", "masterToken", ...},
"success": true}, or "success": false with a code and message). It verifies the token
independently of the broker, with PyJWT against the broker's JWKS fetched over HTTP: signature,
issuer, audience, expiry, subject. Prints what it verified as JSON; exits 1 if the login failed.

usage: snowflake_login_standin.py JWKS_URL ISSUER AUDIENCE SUBJECT CONNECTIONS_FILE CONNECTION_NAME

With EXPECT_DATABASE_USER set, the entry is instead a Vault database user's (password or key
pair) and the stand-in checks that login (see verify_database_user); the first four arguments
are then unused.
"""
import gzip
import json
import os
import pathlib
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt

jwks_url, issuer, audience, subject, connections_file, connection_name = sys.argv[1:7]
seen = {}


def verify_database_user(data, expected):
    """A user from Vault's database engine: its password, or a key-pair JWT (Snowflake's rules:
    iss ACCOUNT.USER.SHA256:<fingerprint>, sub ACCOUNT.USER) the connector signed with the key
    file, checked against the public half of that file."""
    user, secret = expected.split(":", 1)
    if data.get("LOGIN_NAME") != user:
        raise ValueError(f"login {data.get('LOGIN_NAME')!r}, expected {user!r}")
    if data.get("AUTHENTICATOR") == "SNOWFLAKE_JWT":
        from cryptography.hazmat.primitives import serialization

        private = serialization.load_pem_private_key(pathlib.Path(secret).read_bytes(), password=None)
        claims = jwt.decode(data["TOKEN"], private.public_key(), algorithms=["RS256"], options={"require": ["iss", "sub", "exp"]})
        if not claims["sub"].upper().endswith("." + user.upper()):
            raise ValueError(f"key-pair JWT for {claims['sub']!r}")
        return claims
    if data.get("PASSWORD") != secret:
        raise ValueError("wrong password")
    return {"user": user}


def verify(data):
    # EXPECT_DATABASE_USER=user:password or user:/path/to/key.p8 switches to a database user.
    if os.environ.get("EXPECT_DATABASE_USER"):
        return verify_database_user(data, os.environ["EXPECT_DATABASE_USER"])
    if data.get("AUTHENTICATOR") != "WORKLOAD_IDENTITY" or data.get("PROVIDER") != "OIDC":
        raise ValueError(f"not an OIDC workload identity login: {data.get('AUTHENTICATOR')}/{data.get('PROVIDER')}")
    token = data["TOKEN"]
    key = jwt.PyJWKClient(jwks_url).get_signing_key_from_jwt(token)
    claims = jwt.decode(
        token,
        key.key,
        algorithms=["RS256", "ES256"],
        audience=audience,
        issuer=issuer,
        options={"require": ["iss", "aud", "sub", "iat", "exp"]},
    )
    if claims["sub"] != subject:
        raise ValueError(f"subject {claims['sub']!r} is not the user's {subject!r}")
    return claims


class SnowflakeLogin(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def answer(self, body):
        encoded = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(encoded)))
        self.end_headers()
        self.wfile.write(encoded)

    def do_POST(self):
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.headers.get("Content-Encoding") == "gzip":
            raw = gzip.decompress(raw)
        path = self.path.split("?")[0]
        if path == "/session/v1/login-request":
            data = json.loads(raw)["data"]
            seen["login"] = {name: data.get(name) for name in ("ACCOUNT_NAME", "LOGIN_NAME", "AUTHENTICATOR", "PROVIDER")}
            authn = data.get("AUTHENTICATOR") or "SNOWFLAKE"
            try:
                seen["verified"] = verify(data)
            except Exception as error:  # the refusal Snowflake would send, with the reason
                seen["refused"] = str(error)
                self.answer({"data": {"authnMethod": authn}, "code": "390144", "message": f"Invalid token: {error}", "success": False})
                return
            self.answer(
                {
                    "data": {
                        "token": "session-token",
                        "masterToken": "master-token",
                        "validityInSeconds": 3600,
                        "masterValidityInSeconds": 14400,
                        "sessionId": 1,
                        "serverVersion": "9.0.0",
                        "parameters": [{"name": "AUTOCOMMIT", "value": True}],
                        "sessionInfo": {"databaseName": None, "schemaName": None, "warehouseName": None, "roleName": "PUBLIC"},
                    },
                    "code": None,
                    "message": None,
                    "success": True,
                }
            )
        else:  # closing the session, telemetry
            self.answer({"data": None, "code": None, "message": None, "success": True})


server = ThreadingHTTPServer(("127.0.0.1", 0), SnowflakeLogin)
threading.Thread(target=server.serve_forever, daemon=True).start()
# The connector sends workload identity tokens only to Snowflake hosts unless told otherwise.
os.environ["SNOWFLAKE_WIF_ALLOWED_HOST_SUFFIXES"] = "127.0.0.1"

import snowflake.connector  # noqa: E402 (after the environment is set)

try:
    connection = snowflake.connector.connect(
        connection_name=connection_name,
        connections_file_path=pathlib.Path(connections_file),
        host="127.0.0.1",
        port=server.server_address[1],
        protocol="http",
        login_timeout=20,
    )
    connection.close()
    seen["logged_in"] = True
except Exception as error:
    seen["logged_in"] = False
    seen["error"] = str(error)
print(json.dumps(seen))
sys.exit(0 if seen["logged_in"] else 1)
