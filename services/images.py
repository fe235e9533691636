"""`python -m multikernel.services.images` (and `mkctl image`): make keys, sign and check images.

keygen --out DIR [--cn NAME]        a signing key and its self-signed certificate
sign IMAGE --key KEY --cert CERT [--out OUT]
verify IMAGE --trusted CERT...      check the signature (and manifest) as `load` would
pack DIR --out ARCHIVE              a deterministic archive of an image directory
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from multikernel.protocol import MultikernelError
from multikernel.services._image import pack, sign_image, verify_image
from multikernel.services._signature import make_signing_key


def main(argv: list[str] | None = None) -> int:
    top = argparse.ArgumentParser(
        prog="mkctl image",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verbs = top.add_subparsers(dest="verb", required=True)
    keygen = verbs.add_parser("keygen", help="a signing key and its certificate")
    keygen.add_argument("--out", type=Path, required=True)
    keygen.add_argument("--cn", default="multikernel image signing key")
    sign = verbs.add_parser("sign", help="append a signature (kernel module format)")
    sign.add_argument("image", type=Path)
    sign.add_argument("--key", type=Path, required=True)
    sign.add_argument("--cert", type=Path, required=True)
    sign.add_argument("--out", type=Path, default=None)
    verify = verbs.add_parser("verify", help="check an image as `mkctl load` would")
    verify.add_argument("image", type=Path)
    verify.add_argument("--trusted", type=Path, action="append", required=True)
    pack_ = verbs.add_parser("pack", help="a deterministic archive of an image directory")
    pack_.add_argument("directory", type=Path)
    pack_.add_argument("--out", type=Path, required=True)
    args = top.parse_args(argv)
    try:
        if args.verb == "keygen":
            key, cert = make_signing_key(args.cn)
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "signing_key.pem").write_bytes(key)
            (args.out / "signing_key.pem").chmod(0o600)
            (args.out / "signing_cert.pem").write_bytes(cert)
            print(
                f"wrote {args.out / 'signing_key.pem'} and {args.out / 'signing_cert.pem'}; "
                "give the certificate to the host: mkctl host up --trusted-keys CERT"
            )
        elif args.verb == "sign":
            out = sign_image(args.image, args.key.read_bytes(), args.cert.read_bytes(), args.out)
            print(f"signed {out}")
        elif args.verb == "verify":
            verified = verify_image(
                args.image, trusted_certs=[p.read_bytes() for p in args.trusted]
            )
            signer = verified.signer.subject if verified.signer else "unsigned"
            print(
                f"{verified.manifest.name} {verified.manifest.version}: signed by {signer}, "
                f"{verified.digest}"
            )
        else:
            args.out.write_bytes(pack(args.directory))
            print(f"packed {args.directory} into {args.out}")
    except (MultikernelError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
