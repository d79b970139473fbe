# Special files cannot be checked in: make them in the context copy (needs root for mknod).
mkfifo fifo
mknod chr c 1 3
mknod blk b 7 200
chmod 0600 blk
mknod sub/zero c 1 5
chmod 0751 sub/zero
mkfifo sub/pipe
python3 -c 'import socket; socket.socket(socket.AF_UNIX).bind("sock")'
chmod 0640 sock
