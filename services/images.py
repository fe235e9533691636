"""`python -m multikernel.services.images` (and `mkctl image`): make keys, sign and check images.

keygen --out DIR [--cn NAME]        a signing key and its self-signed certificate
sign IMAGE --key KEY --cert CERT [--out OUT]
verify IMAGE --trusted CERT...      check the signature (and manifest) as `load` would
pack DIR --out ARCHIVE [--sign-key KEY --cert CERT]
                                    a deterministic archive of an image directory
build [--kernel RELEASE|auto|latest] --out DIR [--sign-key KEY --cert CERT]
                                    a `qemu` guest image: a Debian cloud kernel and an
                                    initramfs with Python and our package (docs/platform.md)
pack --from-nix PATH --out ARCHIVE [--derivation] [--closure FILE] [--name N] [--version V]
     [--entry 'bin/PROGRAM ARGS'] [--sign-key KEY --cert CERT]
                                    an image of a Nix store path and its closure (docs/images.md)

Exit status: 0 ok, 1 failed, 2 usage (a bad command line, not a store path, an entry outside
the image).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from multikernel.protocol import MultikernelError
from multikernel.services._image import pack, sign_image, verify_image
from multikernel.services._nix import NixInputError, pack_nix
from multikernel.services._qemu_image import build_image, write_image_dir
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
    pack_ = verbs.add_parser(
        "pack", help="a deterministic archive of an image directory or of a Nix store path"
    )
    pack_.add_argument("directory", type=Path, nargs="?")
    pack_.add_argument("--out", type=Path, required=True)
    pack_.add_argument("--from-nix", metavar="PATH", help="a Nix store path or derivation")
    pack_.add_argument("--derivation", action="store_true", help="realise PATH with Nix first")
    pack_.add_argument(
        "--closure", type=Path, help="store paths one a line, or closureInfo (its dir or files)"
    )
    pack_.add_argument("--name", help="the manifest's name (default: from the store path)")
    pack_.add_argument("--version", help="the manifest's version (default: from the store path)")
    pack_.add_argument("--entry", help="what to run, 'bin/PROGRAM ARGS' (default: bin/<name>)")
    pack_.add_argument("--sign-key", type=Path, help="sign the archive with this key")
    pack_.add_argument("--cert", type=Path, help="the signing key's certificate")
    build = verbs.add_parser("build", help="a qemu guest image: a kernel and an initramfs")
    build.add_argument(
        "--kernel",
        default="auto",
        help="a Debian kernel release; auto: the cached one, else the current cloud kernel; "
        "latest: the current cloud kernel",
    )
    build.add_argument("--out", type=Path, required=True, help="the image directory to write")
    build.add_argument("--sign-key", type=Path, help="sign the image with this key")
    build.add_argument("--cert", type=Path, help="the signing key's certificate")
    args = top.parse_args(argv)
    if args.verb == "build" and (args.sign_key is None) != (args.cert is None):
        build.error("--sign-key and --cert go together")
    if args.verb == "pack":
        _check_pack_usage(pack_, args)
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
        elif args.verb == "build":
            auto = args.kernel in ("auto", "latest")
            guest = build_image(
                release=None if auto else args.kernel, refresh=args.kernel == "latest"
            )
            out = write_image_dir(guest, args.out)
            if args.sign_key is not None:
                sign_image(out, args.sign_key.read_bytes(), args.cert.read_bytes())
            print(
                f"built {out}: kernel {guest.kernel_version}, initramfs "
                f"{guest.initramfs.stat().st_size / 2**20:.1f} MiB ({guest.digest[:12]})"
                + (", signed" if args.sign_key is not None else "")
            )
        elif args.from_nix is None:
            _write(args, pack(args.directory))
            print(f"packed {args.directory} into {args.out}")
        else:
            image = pack_nix(
                args.from_nix,
                derivation=args.derivation,
                closure_file=args.closure,
                name=args.name,
                version=args.version,
                entry=args.entry,
            )
            for warning in image.warnings:
                print(f"warning: {warning}", file=sys.stderr)
            _write(args, image.payload)
            print(
                f"packed {image.root.path} ({_paths(len(image.closure))}) into {args.out}: "
                f"{image.manifest.name} {image.manifest.version}, entry "
                f"{shlex.join(image.manifest.entry)}"
            )
    except NixInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (MultikernelError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _check_pack_usage(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if (args.directory is None) == (args.from_nix is None):
        parser.error("pack takes an image directory or --from-nix PATH (one of them)")
    nix_only = ("derivation", "closure", "name", "version", "entry")
    if args.from_nix is None and any(getattr(args, o) for o in nix_only):
        parser.error("--derivation, --closure, --name, --version and --entry go with --from-nix")
    if (args.sign_key is None) != (args.cert is None):
        parser.error("--sign-key and --cert go together")


def _paths(count: int) -> str:
    return f"{count} store path{'' if count == 1 else 's'}"


def _write(args: argparse.Namespace, payload: bytes) -> None:
    """Write the archive to --out, signed when a key is given (as `mkctl image sign` signs)."""
    out: Path = args.out
    temporary = out.with_name(f".{out.name}.{os.getpid()}.unsigned")
    temporary.write_bytes(payload)
    try:
        if args.sign_key is not None:
            sign_image(temporary, args.sign_key.read_bytes(), args.cert.read_bytes(), out)
        else:
            temporary.replace(out)
    finally:
        temporary.unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
