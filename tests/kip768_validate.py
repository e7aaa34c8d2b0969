"""Validates a broker-minted Kafka token the way Kafka's KIP-768 validator does, with an
independent JWT library (PyJWT): JWKS fetched over HTTP, expected audience and issuer,
required exp/iat/sub, 30 s clock skew. Prints the principal (sub) and scope as JSON.

usage: kip768_validate.py JWKS_URL EXPECTED_AUDIENCE EXPECTED_ISSUER < token
"""
import json
import sys

import jwt

jwks_url, audience, issuer = sys.argv[1:4]
token = sys.stdin.read().strip()
signing_key = jwt.PyJWKClient(jwks_url).get_signing_key_from_jwt(token)
claims = jwt.decode(
    token,
    signing_key.key,
    algorithms=["RS256", "ES256"],
    audience=audience,
    issuer=issuer,
    leeway=30,
    options={"require": ["exp", "iat", "sub"]},
)
print(json.dumps({"principal": claims["sub"], "scope": claims.get("scope", "").split()}))
