"""Validates a Snowflake key-pair JWT the way Snowflake does, independently of the broker.

Usage: snowflake_verify.py PRIVATE_KEY_PEM_FILE EXPECTED_ACCOUNT EXPECTED_USER DEADLINE_UNIX < token

The public key is derived from the service user's private key with `cryptography` (what
`ALTER USER ... SET RSA_PUBLIC_KEY` registers); its fingerprint is computed here, from the DER
SubjectPublicKeyInfo, exactly as Snowflake documents; PyJWT checks the RS256 signature.
Prints the verified claims as JSON; exits 1 with the reason otherwise.
"""

import base64
import hashlib
import json
import sys

import jwt
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_pem_private_key

SNOWFLAKE_MAX_LIFETIME = 3600


def fail(message):
    print(message, file=sys.stderr)
    sys.exit(1)


def main():
    key_file, account, user, deadline = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    token = sys.stdin.read().strip()
    with open(key_file, "rb") as f:
        public_key = load_pem_private_key(f.read(), password=None).public_key()
    der = public_key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    fingerprint = "SHA256:" + base64.b64encode(hashlib.sha256(der).digest()).decode()

    header = jwt.get_unverified_header(token)
    if header.get("alg") != "RS256":
        fail(f"alg is {header.get('alg')!r}, Snowflake wants RS256")
    try:
        claims = jwt.decode(
            token,
            public_key,
            algorithms=["RS256"],
            options={"require": ["iss", "sub", "iat", "exp"], "verify_aud": False},
        )
    except jwt.PyJWTError as error:
        fail(f"signature or claims rejected: {error}")

    qualified = f"{account.upper()}.{user.upper()}"
    if claims["sub"] != qualified:
        fail(f"sub is {claims['sub']!r}, expected {qualified!r}")
    if claims["iss"] != f"{qualified}.{fingerprint}":
        fail(f"iss is {claims['iss']!r}, expected {qualified}.{fingerprint}")
    if claims["exp"] - claims["iat"] > SNOWFLAKE_MAX_LIFETIME:
        fail(f"exp is {claims['exp'] - claims['iat']} s after iat; Snowflake allows at most {SNOWFLAKE_MAX_LIFETIME}")
    if claims["exp"] > deadline:
        fail(f"exp {claims['exp']} is past the job deadline {deadline}")
    print(json.dumps({"claims": claims, "fingerprint": fingerprint}))


main()
