"""Restarts no reader notices: the FUSE connection handed from one imgfs process to the next.

The kernel keeps a FUSE mount alive as long as any process holds its ``/dev/fuse`` file. So imgfs
mounts with a ``/dev/fuse`` fd of its own (connection.py) and gives systemd a copy to keep in the
service's file-descriptor store (fdstore.py), with a memfd beside it (state.py) that holds what a
successor needs: the kernel's FUSE_INIT request, the inode numbers the kernel knows, and the open
file handles. On a restart the old process stops reading requests, answers those it read, and exits
without unmounting; requests made meanwhile wait in the kernel. The next process gets both fds back
from systemd, replays the saved INIT into its own libfuse session (the patched pyfuse3's
``replay_init``: the kernel sends INIT once per mount), and answers them.

Needs the patched pyfuse3 (patches/pyfuse3) and systemd's fd store (a native service with
``FileDescriptorStoreMax=``); without either, a restart unmounts and mounts again, as before.
Knows nothing of stores or images: fs.py maps its own inodes and handles onto the state's.
"""

from __future__ import annotations

import pyfuse3

# Whether this pyfuse3 can serve a connection whose INIT an earlier process answered.
REPLAY = hasattr(pyfuse3, "replay_init")
