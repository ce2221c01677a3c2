"""A real SPIFFE Workload API client (PyPI `spiffe`, the py-spiffe library) for workload_api.rs.

  client.py fetch SOCKET      one JSON line: the SVIDs (id, serial, hint-free checks) and the bundles
  client.py watch SOCKET N    one JSON line per streamed X.509 context, until N were seen
  client.py noheader SOCKET   calls FetchX509SVID without the security header; prints the gRPC status
Errors are printed as one JSON line {"error": TYPE, "detail": TEXT} and exit 0, so the test reads them.
"""
import json
import sys
import threading

import grpc
from cryptography.hazmat.primitives import serialization
from spiffe import TrustDomain, WorkloadApiClient
from spiffe._proto import workload_pb2, workload_pb2_grpc


def public(key):
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def svid_json(svid):
    return {
        "id": str(svid.spiffe_id),
        "serial": format(svid.leaf.serial_number, "x"),
        "chain": len(svid.cert_chain),
        "key_matches": public(svid.private_key.public_key()) == public(svid.leaf.public_key()),
    }


def main():
    what, socket = sys.argv[1], "unix://" + sys.argv[2]
    if what == "noheader":
        channel = grpc.insecure_channel(socket)
        stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)
        try:
            next(stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), timeout=5))
            print(json.dumps({"status": "OK"}))
        except grpc.RpcError as e:
            print(json.dumps({"status": e.code().name, "detail": e.details()}))
        return
    try:
        with WorkloadApiClient(socket_path=socket) as client:
            if what == "fetch":
                svids = client.fetch_x509_svids(timeout=10)
                bundles = client.fetch_x509_bundles(timeout=10)
                td = TrustDomain(str(svids[0].spiffe_id.trust_domain))
                bundle = bundles.get_bundle_for_trust_domain(td)
                context = client.fetch_x509_context(timeout=10)
                print(json.dumps({
                    "svids": [svid_json(s) for s in svids],
                    "bundle_roots": len(bundle.x509_authorities) if bundle else 0,
                    "trust_domains": sorted(str(b.trust_domain) for b in bundles.bundles),
                    # From FetchX509SVID: the SVID's own domain and the federated ones.
                    "context_trust_domains": sorted(str(b.trust_domain) for b in context.x509_bundle_set.bundles),
                }), flush=True)
            elif what == "watch":
                want, seen, done = int(sys.argv[3]), [], threading.Event()

                def on_success(context):
                    seen.append(context)
                    print(json.dumps({"svids": [svid_json(s) for s in context.x509_svids]}), flush=True)
                    if len(seen) >= want:
                        done.set()

                def on_error(e):
                    print(json.dumps({"error": type(e).__name__, "detail": str(e)}), flush=True)
                    done.set()

                handle = client.stream_x509_contexts(on_success, on_error, retry_connect=False)
                done.wait(60)
                handle.cancel()
    except Exception as e:  # the test asserts on the type and text
        print(json.dumps({"error": type(e).__name__, "detail": str(e)}), flush=True)


main()
