"""Connects the real snowflake-connector-python to a fakesnow server using only the variables
`credbroker exchange --format env` prints for a snowflake_keypair credential (read from this
process's environment), then runs SQL. Prints the query results as JSON.

fakesnow does not check credentials (PEERS.md); what this proves is that the variables are
enough for a real client: the connector logs in with AUTHENTICATOR=SNOWFLAKE_JWT and the
broker's JWT as TOKEN, which is what Snowflake's login-request expects for key-pair login.
"""

import json
import os
import sys
from urllib.parse import urlparse

import snowflake.connector
from snowflake.connector.auth.keypair import AuthByKeyPair


class BrokerMintedKeyPairJwt(AuthByKeyPair):
    """Key-pair login with a JWT the broker already signed: the job never holds the private key."""

    def __init__(self, jwt_token):
        super().__init__(private_key=b"unused")
        self._jwt_token = jwt_token

    def prepare(self, **kwargs):
        return self._jwt_token


def main():
    env = os.environ
    url = urlparse(env["SNOWFLAKE_URL"])
    assert env["SNOWFLAKE_AUTHENTICATOR"] == "SNOWFLAKE_JWT", env["SNOWFLAKE_AUTHENTICATOR"]
    auth = BrokerMintedKeyPairJwt(env["SNOWFLAKE_JWT"])
    sent = {}
    original_update_body = auth.update_body

    def record_body(body):
        original_update_body(body)
        sent.update(authenticator=body["data"]["AUTHENTICATOR"], token=body["data"]["TOKEN"])

    auth.update_body = record_body
    connection = snowflake.connector.connect(
        account=env["SNOWFLAKE_ACCOUNT"],
        user=env["SNOWFLAKE_USER"],
        host=url.hostname,
        port=url.port,
        protocol=url.scheme,
        database=env.get("SNOWFLAKE_DATABASE"),
        schema=env.get("SNOWFLAKE_SCHEMA"),
        auth_class=auth,
        login_timeout=20,
    )
    try:
        cursor = connection.cursor()
        cursor.execute("create table if not exists broker_check (n int)")
        cursor.execute("insert into broker_check values (41), (1)")
        cursor.execute("select sum(n) from broker_check")
        total = cursor.fetchone()[0]
    finally:
        connection.close()
    if sent.get("token") != env["SNOWFLAKE_JWT"]:
        print("the connector did not send the broker's JWT", file=sys.stderr)
        sys.exit(1)
    print(json.dumps({"sum": total, "authenticator": sent["authenticator"]}))


main()
