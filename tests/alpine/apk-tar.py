#!/usr/bin/env python3
"""Tar writer for tests/alpine/make-repo, independent of Basalt's Rust code.

GNU tar cannot attach a different PAX record to each file, and abuild's
`abuild-tar` is not available here, so the tar streams of test packages are
written with Python's tarfile module (an independent implementation):

  apk-tar.py data <root-dir> <out.tar> [hostile]
      Complete tar (with end-of-archive blocks) of <root-dir>, entries sorted,
      owner root:root, every regular file
      preceded by a PAX header `APK-TOOLS.checksum.SHA1=<hex>` (symlinks: sha1 of
      the target), as abuild-tar --hash does (REFERENCE.md 5.1). Prints the
      installed size (sum of regular file sizes).
      hostile: traversal | symlink-escape | device | setuid | bad-file-checksum | nosum
      (or `xattr`: a file capability record on the first file, not hostile)
  apk-tar.py segment <out.tar> <name>=<file> ...
      Tar *segment* (no end-of-archive blocks, as abuild-tar --cut): the control
      member (.PKGINFO, scripts) or the signature member (.SIGN.RSA.<key>).
"""
import hashlib
import io
import os
import stat
import sys
import tarfile

MTIME = int(os.environ.get("SOURCE_DATE_EPOCH", "1700000000"))


def pax_info(name, **kw):
    ti = tarfile.TarInfo(name)
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = "root"
    ti.mtime = MTIME
    for k, v in kw.items():
        setattr(ti, k, v)
    return ti


def add_file(tar, name, data, mode=0o644, checksum="ok", xattr=False):
    ti = pax_info(name, size=len(data), mode=mode, type=tarfile.REGTYPE)
    if checksum == "ok":
        ti.pax_headers = {"APK-TOOLS.checksum.SHA1": hashlib.sha1(data).hexdigest()}
    elif checksum == "bad":
        ti.pax_headers = {"APK-TOOLS.checksum.SHA1": hashlib.sha1(data + b"x").hexdigest()}
    if xattr:
        # A file capability (cap_net_raw+ep), as GNU tar --xattrs records it.
        ti.pax_headers["SCHILY.xattr.security.capability"] = \
            "\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"
    tar.addfile(ti, io.BytesIO(data))


def data(root, out, hostile):
    installed = 0
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        entries = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for n in dirnames + sorted(filenames):
                full = os.path.join(dirpath, n)
                entries.append((os.path.relpath(full, root), full))
        entries.sort()
        first_file = True
        for rel, full in entries:
            st = os.lstat(full)
            mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISDIR(st.st_mode):
                tar.addfile(pax_info(rel, type=tarfile.DIRTYPE, mode=mode))
            elif stat.S_ISLNK(st.st_mode):
                target = os.readlink(full)
                ti = pax_info(rel, type=tarfile.SYMTYPE, linkname=target, mode=0o777)
                ti.pax_headers = {
                    "APK-TOOLS.checksum.SHA1": hashlib.sha1(target.encode()).hexdigest()
                }
                tar.addfile(ti)
            else:
                with open(full, "rb") as f:
                    content = f.read()
                installed += len(content)
                checksum = "ok"
                if first_file and hostile == "bad-file-checksum":
                    checksum = "bad"
                if first_file and hostile == "nosum":
                    checksum = None
                if first_file and hostile == "setuid":
                    mode |= 0o4000
                xattr = first_file and hostile == "xattr"
                first_file = False
                add_file(tar, rel, content, mode, checksum, xattr)
        if hostile == "traversal":
            add_file(tar, "../../etc/escaped", b"escaped\n")
        elif hostile == "symlink-escape":
            tar.addfile(pax_info("usr/lib/hostile-link", type=tarfile.SYMTYPE,
                                 linkname="/etc", mode=0o777))
            add_file(tar, "usr/lib/hostile-link/shadow", b"root::0:0::::\n")
        elif hostile == "device":
            tar.addfile(pax_info("dev/hostile-mem", type=tarfile.CHRTYPE, mode=0o666,
                                 devmajor=1, devminor=1))
    print(installed)


def segment(out, pairs):
    buf = io.BytesIO()
    for p in pairs:
        name, path = p.split("=", 1)
        with open(path, "rb") as f:
            content = f.read()
        ti = pax_info(name, size=len(content), mode=0o644, type=tarfile.REGTYPE)
        buf.write(ti.tobuf(format=tarfile.USTAR_FORMAT))
        buf.write(content)
        pad = (-len(content)) % 512
        buf.write(b"\0" * pad)
    with open(out, "wb") as f:
        f.write(buf.getvalue())


def main():
    if len(sys.argv) >= 4 and sys.argv[1] == "data":
        data(sys.argv[2], sys.argv[3], sys.argv[4] if len(sys.argv) > 4 else "")
    elif len(sys.argv) >= 4 and sys.argv[1] == "segment":
        segment(sys.argv[2], sys.argv[3:])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
