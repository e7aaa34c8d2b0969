#!/usr/bin/env python3
"""Receives deliveries the broker forwards from Gogs, exchanges them for a credential and runs
a job. Standard library only.

    CREDBROKER_URL=https://credbroker.internal \
    CREDBROKER_ROLE=warehouse-loader \
    IDENTITY_TOKEN_FILE=/var/run/secrets/tokens/credbroker \
    python3 automation.py --listen 0.0.0.0:8090 --tls-cert loader.pem --tls-key loader-key.pem -- ./load.sh

The broker POSTs JSON {delivery_id, event, repository, ref, after, pusher, delivery_token, payload}
to this server (the hook's forward_url). For each push the job runs with the credential's
environment (e.g. KAFKA_OAUTHBEARER_TOKEN) plus GOGS_REPOSITORY, GOGS_REF and GOGS_SHA.
If IDENTITY_TOKEN_FILE is set, the automation presents its own identity token as Bearer and
the delivery token in X-Credbroker-Delivery (roles with [role.delivery]); otherwise the
delivery token itself is the Bearer token (roles with issuer = "gogs").
"""
import argparse
import json
import os
import ssl
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MAX_BODY = 1024 * 1024


def exchange(delivery_token):
    headers = {"Content-Type": "application/json"}
    identity_file = os.environ.get("IDENTITY_TOKEN_FILE")
    if identity_file:
        with open(identity_file) as f:
            headers["Authorization"] = "Bearer " + f.read().strip()
        headers["X-Credbroker-Delivery"] = delivery_token
    else:
        headers["Authorization"] = "Bearer " + delivery_token
    body = json.dumps({"role": os.environ["CREDBROKER_ROLE"]}).encode()
    request = urllib.request.Request(os.environ["CREDBROKER_URL"].rstrip("/") + "/v1/credentials", body, headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.load(response)
    except urllib.error.HTTPError as error:
        problem = json.loads(error.read() or b"{}")
        raise RuntimeError(f"credbroker refused ({error.code} {problem.get('code')}): {problem.get('detail')}")


def run_job(delivery, command):
    issued = exchange(delivery["delivery_token"])
    env = dict(os.environ, **issued["env"])
    env.update(GOGS_REPOSITORY=delivery["repository"], GOGS_REF=delivery["ref"], GOGS_SHA=delivery["after"] or "")
    print(f"delivery {delivery['delivery_id']}: credential {issued['issuance_id']} for {issued['ttl_seconds']} s", flush=True)
    result = subprocess.run(command, env=env, timeout=issued["ttl_seconds"])
    print(f"delivery {delivery['delivery_id']}: job exited {result.returncode}", flush=True)


def handler(command):
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                self.send_error(413)
                return
            delivery = json.loads(self.rfile.read(length))
            if delivery.get("event") != "push":
                self.send_response(204)
                self.end_headers()
                return
            # Answer at once (the broker waits at most forward_timeout_seconds) and work after.
            threading.Thread(target=self.work, args=(delivery,), daemon=True).start()
            self.send_response(202)
            self.end_headers()

        def work(self, delivery):
            try:
                run_job(delivery, command)
            except Exception as error:  # noqa: BLE001 - one failed delivery must not stop the server
                print(f"delivery {delivery.get('delivery_id')}: {error}", file=sys.stderr, flush=True)

    return Handler


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", default="127.0.0.1:8090")
    # The broker forwards only to https URLs (plain http only on loopback): serve TLS here, or
    # put a TLS-terminating proxy in front.
    parser.add_argument("--tls-cert", help="PEM certificate chain to serve HTTPS with")
    parser.add_argument("--tls-key", help="PEM private key of --tls-cert")
    parser.add_argument("command", nargs="+")
    args = parser.parse_args()
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    host, port = args.listen.rsplit(":", 1)
    server = ThreadingHTTPServer((host, int(port)), handler(args.command))
    if args.tls_cert:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(args.tls_cert, args.tls_key)
        server.socket = context.wrap_socket(server.socket, server_side=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
