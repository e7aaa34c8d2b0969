"""A real Kafka client fetching and refreshing its own OAUTHBEARER token: confluent-kafka, whose
bundled librdkafka implements `sasl.oauthbearer.method=oidc`. Of the grants librdkafka's
CONFIGURATION.md lists, `client_credentials` authenticates only with a client id and secret,
so the job token goes in as a jwt-bearer assertion (RFC 7523 section 2.1) read from
`sasl.oauthbearer.assertion.file` at every fetch. librdkafka refreshes at 80 % of a token's
lifetime by itself. tansu cannot check OAUTHBEARER, so the SASL outcome is not looked at.

usage: kafka_oidc_client.py BOOTSTRAP TOKEN_ENDPOINT_URL ASSERTION_FILE ROLE SECONDS
"""
import sys
import time

from confluent_kafka import Producer

bootstrap, token_url, assertion_file, role, seconds = sys.argv[1:6]
producer = Producer(
    {
        "bootstrap.servers": bootstrap,
        "security.protocol": "SASL_PLAINTEXT",
        "sasl.mechanism": "OAUTHBEARER",
        "sasl.oauthbearer.method": "oidc",
        "sasl.oauthbearer.grant.type": "urn:ietf:params:oauth:grant-type:jwt-bearer",
        "sasl.oauthbearer.assertion.file": assertion_file,
        "sasl.oauthbearer.token.endpoint.url": token_url,
        "sasl.oauthbearer.scope": role,
        "error_cb": lambda error: print(f"kafka: {error}", file=sys.stderr, flush=True),
    }
)
# Token refreshes are served from the client's queue, so keep polling it.
deadline = time.monotonic() + float(seconds)
while time.monotonic() < deadline:
    producer.poll(0.2)
