"""``python -m xattn_video``: the same command as the ``xattn-video`` console script."""

from xattn_video.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
