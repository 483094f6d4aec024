"""`rau-rt serve-localizer` and `rau-rt triton-repo`: the central localizer (Triton).

`serve-localizer` serves a bundle's VLM through PyTriton from the server environment: in
this process when PyTriton imports here, else by re-executing itself with the environment's
Python (`--env`, $RAU_RT_SERVER_ENV or ./.venv-server); `--make-env DIR` creates that
environment. `triton-repo` writes a model repository for a production tritonserver.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

from rau_rt.errors import InputError
from rau_rt.serving import environment


def configure_serve(parser: argparse.ArgumentParser) -> None:
    from rau_rt.serving import server

    server.add_arguments(parser)
    parser.add_argument("--env", default=None, metavar="DIR",
                        help="the server environment (default: $RAU_RT_SERVER_ENV, else "
                        "./.venv-server) when PyTriton does not import here")
    parser.add_argument("--make-env", default=None, metavar="DIR",
                        help="create the server environment at DIR (PyTriton, numpy < 2, this "
                        "rau-rt) and exit; --bundle is then not needed")


def run_serve(args: argparse.Namespace) -> int:
    from rau_rt.serving import server

    if args.make_env is not None:
        python = environment.make_env(args.make_env)
        print(f"server environment ready: {python}\nserve with: rau-rt serve-localizer "
              f"--env {args.make_env} --bundle BUNDLE")
        return 0
    if args.bundle is None:
        raise InputError("--bundle is required (a VLM bundle or a pipeline bundle with vlm/)")
    server.check_bind(args.host, args.allow_remote)
    forwarded = _forwarded(args.argv)
    if importlib.util.find_spec("pytriton") is not None:
        return server.main(forwarded)
    env = environment.find_env(args.env)
    if env is None:
        raise InputError("PyTriton is not installed here and no server environment was found "
                         f"(--env, ${environment.ENV_VARIABLE}, ./{environment.DEFAULT_ENV}); "
                         f"create one with `rau-rt serve-localizer --make-env "
                         f"{environment.DEFAULT_ENV}` (see README 'Central localizer')")
    python = str(environment.env_python(env))
    sys.stdout.flush()
    os.execv(python, [python, "-m", "rau_rt.serving.server", *forwarded])


def _forwarded(argv: list[str]) -> list[str]:
    """The command's own arguments, without the subcommand and the launcher's --env."""
    args = list(argv[1:]) if argv and argv[0] == "serve-localizer" else list(argv)
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg == "--env":
            skip = True
        elif not arg.startswith("--env="):
            out.append(arg)
    return out


def configure_repo(parser: argparse.ArgumentParser) -> None:
    from rau_rt.serving.repository import RepositoryConfig

    defaults = RepositoryConfig()
    parser.add_argument("--bundle", type=Path, required=True,
                        help="a VLM bundle, or a pipeline bundle with a vlm/ part")
    parser.add_argument("--out", type=Path, required=True, help="the model repository (new)")
    parser.add_argument("--kind", choices=("cpu", "gpu"), default=defaults.kind,
                        help="instance kind (KIND_CPU or KIND_GPU)")
    parser.add_argument("--max-batch", type=int, default=defaults.max_batch,
                        help="requests handed to the model at once (> 1: dynamic batching)")
    parser.add_argument("--max-references", type=int, default=defaults.max_references)
    parser.add_argument("--max-cache-mb", type=float, default=defaults.max_cache_mb)
    parser.add_argument("--copy-bundle", action="store_true",
                        help="copy the bundle into the repository (default: refer to its path)")


def run_repo(args: argparse.Namespace) -> int:
    from rau_rt.serving.repository import RepositoryConfig, write_repository

    config = RepositoryConfig(kind=args.kind, max_batch=args.max_batch,
                              max_references=args.max_references,
                              max_cache_mb=args.max_cache_mb, copy_bundle=args.copy_bundle)
    written = write_repository(args.bundle, args.out, config)
    print(f"model repository: {args.out}")
    for path in written:
        print(f"  {path.relative_to(args.out)}")
    print(f"start it with: tritonserver --model-repository {args.out.resolve()} "
          "(see README 'Central localizer' for the container command)")
    return 0
