package cache

import (
	"context"
	"fmt"
	"io"
	"path"

	storagedriver "github.com/distribution/distribution/v3/registry/storage/driver"
	"github.com/opencontainers/go-digest"
)

// How verified content becomes a cache entry, and how an entry goes away,
// depends on what the storage driver guarantees. Readers only ever read
// final paths (dataPath), so what matters is what a final path can show:
//
//   - OpenFilesystem: the spool is renamed into place (commitSpool): a
//     rename is atomic.
//   - s3-aws: a driver Writer is a multipart upload, which is no object at
//     all until Commit completes it; CompleteMultipartUpload then publishes
//     the whole object at once. So the commit writes the final path
//     itself: one step, no copy, and a process killed mid-upload leaves an
//     incomplete multipart upload that no List, Stat or Reader sees (a
//     bucket lifecycle rule aborts it; docs/CONFIG.md). The driver's Move
//     is a copy and a delete; it is not used on the commit path.
//   - every other driver writes in place or may publish a partial object
//     before Commit (gcs stores the buffered part at the path on Close and
//     deletes the path on Cancel; azure appends to a visible blob;
//     filesystem and inmemory write the file itself): the content goes to
//     /_uploads/<instance>/<random>/data and Move puts it in place
//     afterwards (a rename, or a server-side copy that creates the
//     destination whole).
//
// Either way the bytes sent to the driver are hashed on the way and
// compared with the digest before Commit: what becomes visible is what
// was verified, even if the spool changed on disk after the fill checked it.

// directCommit reports whether drv (by its Name) is a driver whose Writer
// shows nothing at its path before Commit, publishes the whole content at
// Commit, and whose Cancel drops only its own upload. The s3-aws driver's
// Writer keeps that promise as long as nothing is written after a Close
// (never, here): only a Write after a short part, which Close flushes,
// makes it complete an upload early.
func directCommit(drv storagedriver.StorageDriver) bool {
	switch drv.Name() {
	case "s3aws":
		return true
	}
	return false
}

// commitFile makes the size bytes of src the content of k's final path, in
// one step that readers can observe (see above). An entry that is already
// there with that size — another replica filled the same digest — is kept
// as it is: it was verified when it was written.
func (c *Cache) commitFile(ctx context.Context, k key, src io.Reader, size int64) error {
	final := dataPath(k)
	if fi, err := c.drv.Stat(ctx, final); err == nil && !fi.IsDir() && fi.Size() == size {
		return nil
	}
	target, up := final, ""
	if !c.direct {
		up = path.Join(uploadsDir, c.instance, randomID())
		target = up + "/" + dataName
	}
	bg := context.WithoutCancel(ctx)
	w, err := c.drv.Writer(ctx, target, false)
	if err != nil {
		return fmt.Errorf("open upload: %w", err)
	}
	err = copyVerified(w, src, k.d, size)
	if commitHook != nil {
		commitHook(k)
	}
	if err == nil {
		if err = w.Commit(ctx); err != nil {
			err = fmt.Errorf("complete upload: %w", err)
		}
	}
	if err != nil {
		_ = w.Cancel(bg)
		if c.direct {
			// Cancel aborted the multipart upload; Close would send the
			// buffered tail to it.
			return err
		}
		_ = w.Close()
		_ = c.drv.Delete(bg, up)
		return err
	}
	cerr := w.Close() // hands the driver's buffer back; the content is committed
	if c.direct {
		return nil
	}
	if cerr != nil {
		_ = c.drv.Delete(bg, up)
		return fmt.Errorf("close upload: %w", cerr)
	}
	err = c.drv.Move(ctx, target, final)
	if derr := c.drv.Delete(bg, up); derr != nil && !isNotFound(derr) && err == nil {
		c.log.Debug("cache: remove upload dir", "path", up, "err", derr)
	}
	if err != nil {
		return fmt.Errorf("move upload into place: %w", err)
	}
	return nil
}

// copyVerified copies src to w, hashing it, and fails unless it was size
// bytes with digest d.
func copyVerified(w io.Writer, src io.Reader, d digest.Digest, size int64) error {
	h := d.Algorithm().Hash()
	bp := largeBufPool.Get().(*[]byte)
	defer largeBufPool.Put(bp)
	n, err := io.CopyBuffer(w, io.TeeReader(src, h), *bp)
	switch {
	case err != nil:
		return fmt.Errorf("upload after %d bytes: %w", n, err)
	case n != size:
		return fmt.Errorf("%w: uploaded %d of %d bytes", ErrSizeMismatch, n, size)
	}
	if got := digest.NewDigest(d.Algorithm(), h); got != d {
		return fmt.Errorf("%w: uploaded content hashes to %s", ErrDigestMismatch, got)
	}
	return nil
}

// removeData takes k's content off its final path, first: readers stop
// finding the entry before anything else of it goes. Where a Delete of one
// object is atomic (s3-aws) that is the Delete; elsewhere the data is
// moved to /_trash and deleted there, so that an interrupted deletion never
// leaves a half-deleted file at the final path.
func (c *Cache) removeData(ctx context.Context, k key) error {
	if c.direct {
		return c.drv.Delete(ctx, dataPath(k))
	}
	trash := trashDir + "/" + randomID()
	if err := c.drv.Move(ctx, dataPath(k), trash+"/"+dataName); err != nil {
		return err
	}
	if err := c.drv.Delete(ctx, trash); err != nil && !isNotFound(err) {
		c.log.Warn("cache: empty trash", "err", err)
	}
	return nil
}

// commitHook, when set (tests only), runs between writing an upload and
// committing it.
var commitHook func(key)
