#!/bin/sh
# Run COMMAND as a Ray driver of the cluster at $RAY_ADDRESS.
#
# With a host:port address, ray.init() connects through a raylet on its own
# machine, which Ray 2.60 finds in the local process list. A container that is
# not yet a Ray node therefore joins the cluster first. It offers no CPUs and no
# GPUs, so that no trial is placed on it. The command then replaces this shell,
# so that it receives the container's stop signal itself. The node leaves the
# cluster when the container stops. A Ray Client address (ray://...) needs no
# local node, so the command runs directly.
set -eu

if [ "$#" -eq 0 ]; then
    echo "usage: ray-driver COMMAND [ARGUMENT...]" >&2
    exit 2
fi

case "${RAY_ADDRESS:-}" in
    "")
        echo "error: RAY_ADDRESS is not set. Set it to the head node's host:port, e.g. ray-head:6379" >&2
        exit 2
        ;;
    ray://*)
        exec "$@"
        ;;
esac

if ! ray start --address="$RAY_ADDRESS" --num-cpus=0 --num-gpus=0; then
    echo "error: failed to join the Ray cluster at $RAY_ADDRESS" >&2
    exit 1
fi
exec "$@"
