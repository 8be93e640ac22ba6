package cache

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/opencontainers/go-digest"
)

// Reader reads one blob, from a committed cache entry or from the spool of
// a fill in flight. It is an io.ReadSeekCloser, an io.ReaderAt and an
// io.WriterTo. Read, Seek and WriteTo must not be called concurrently;
// ReadAt may be.
//
// Reading from a fill blocks while the reader is ahead of it; the blob's
// last byte is released only after the digest is verified, and a failed
// fill fails Read with its *FillError (also after earlier Reads returned
// bytes). A Reader of a committed entry on the filesystem driver reads the
// file itself, and WriteTo lets the kernel copy it (sendfile) to a network
// connection or an http.ResponseWriter.
type Reader struct {
	c    *Cache
	k    key
	size int64
	src  Source
	off  int64

	// fill in flight
	f      *fill
	ctx    context.Context
	cancel context.CancelFunc

	// committed entry: file when the driver hands out an *os.File, else rc
	// positioned at rcPos
	file   *os.File
	rc     io.ReadCloser
	rcPos  int64
	closed bool
}

// openCommitted opens k's committed entry. The caller has counted k in use.
func (c *Cache) openCommitted(ctx context.Context, k key) (*Reader, error) {
	rc, err := c.drv.Reader(ctx, dataPath(k), 0)
	if err != nil {
		return nil, err
	}
	r := &Reader{c: c, k: k, src: SourceCache, ctx: ctx}
	if f, ok := rc.(*os.File); ok {
		fi, err := f.Stat()
		if err != nil {
			_ = f.Close()
			return nil, err
		}
		r.file, r.size = f, fi.Size()
		return r, nil
	}
	fi, err := c.drv.Stat(ctx, dataPath(k))
	if err != nil {
		_ = rc.Close()
		return nil, err
	}
	r.rc, r.size = rc, fi.Size()
	return r, nil
}

// Size is the blob's size, or -1 while a fill whose upstream did not
// announce it is running.
func (r *Reader) Size() int64 {
	if r.size < 0 && r.f != nil {
		r.size = r.f.sizeNow()
	}
	return r.size
}

// Digest is the blob's digest.
func (r *Reader) Digest() digest.Digest { return r.k.d }

// Source tells whether the blob came from the cache, from a fill this
// request started, or from a fill it joined.
func (r *Reader) Source() Source { return r.src }

var errClosedReader = errors.New("cache: read from a closed Reader")

// Read reads from the current offset.
func (r *Reader) Read(p []byte) (int, error) {
	if r.closed {
		return 0, errClosedReader
	}
	var n int
	var err error
	switch {
	case r.f != nil:
		n, err = r.f.readAt(r.ctx, p, r.off)
	case r.file != nil:
		if r.off >= r.size {
			return 0, io.EOF
		}
		n, err = r.file.ReadAt(p, r.off)
		if err == io.EOF && n > 0 {
			err = nil
		}
	default:
		if err = r.position(); err != nil {
			return 0, err
		}
		n, err = r.rc.Read(p)
		r.rcPos += int64(n)
	}
	r.off += int64(n)
	return n, err
}

// position reopens the driver reader at r.off if it is elsewhere.
func (r *Reader) position() error {
	if r.rc != nil && r.rcPos == r.off {
		return nil
	}
	if r.rc != nil {
		_ = r.rc.Close()
		r.rc = nil
	}
	if r.off >= r.size {
		r.rc, r.rcPos = io.NopCloser(eofReader{}), r.off
		return nil
	}
	rc, err := r.c.drv.Reader(r.ctx, dataPath(r.k), r.off)
	if err != nil {
		return fmt.Errorf("cache: read %s: %w", r.k.d, err)
	}
	r.rc, r.rcPos = rc, r.off
	return nil
}

type eofReader struct{}

func (eofReader) Read([]byte) (int, error) { return 0, io.EOF }

// Seek sets the offset of the next Read or WriteTo. Seeking past the end
// is allowed (Read then returns io.EOF); io.SeekEnd needs a known size.
func (r *Reader) Seek(offset int64, whence int) (int64, error) {
	if r.closed {
		return 0, errClosedReader
	}
	var abs int64
	switch whence {
	case io.SeekStart:
		abs = offset
	case io.SeekCurrent:
		abs = r.off + offset
	case io.SeekEnd:
		size := r.Size()
		if size < 0 {
			return 0, errors.New("cache: seek from the end of a blob of unknown size")
		}
		abs = size + offset
	default:
		return 0, errors.New("cache: invalid whence")
	}
	if abs < 0 {
		return 0, errors.New("cache: negative position")
	}
	r.off = abs
	return abs, nil
}

// ReadAt reads len(p) bytes at off (waiting for a fill to reach them), or
// fewer with an error.
func (r *Reader) ReadAt(p []byte, off int64) (int, error) {
	if r.closed {
		return 0, errClosedReader
	}
	if off < 0 {
		return 0, errors.New("cache: negative offset")
	}
	switch {
	case r.f != nil:
		n := 0
		for n < len(p) {
			m, err := r.f.readAt(r.ctx, p[n:], off+int64(n))
			n += m
			if err != nil {
				return n, err
			}
		}
		return n, nil
	case r.file != nil:
		return r.file.ReadAt(p, off)
	default:
		if off >= r.size {
			return 0, io.EOF
		}
		rc, err := r.c.drv.Reader(r.ctx, dataPath(r.k), off)
		if err != nil {
			return 0, err
		}
		defer rc.Close()
		n, err := io.ReadFull(rc, p)
		if err == io.ErrUnexpectedEOF {
			err = io.EOF
		}
		return n, err
	}
}

// copyBufSize is the buffer of WriteTo when no zero-copy path applies.
const copyBufSize = 1 << 20

// WriteTo writes the rest of the blob to w. From a committed file it lets
// the kernel copy (sendfile) when w is a TCP or Unix connection or an
// http.ResponseWriter on one; otherwise it copies with a large buffer.
func (r *Reader) WriteTo(w io.Writer) (int64, error) {
	if r.closed {
		return 0, errClosedReader
	}
	switch {
	case r.f != nil:
		return r.writeFromFill(w)
	case r.file != nil:
		if r.off >= r.size {
			return 0, nil
		}
		if _, err := r.file.Seek(r.off, io.SeekStart); err != nil {
			return 0, err
		}
		var n int64
		var err error
		if _, ok := w.(io.ReaderFrom); ok && w != io.Discard {
			// *os.File.WriteTo -> sendfile to a connection, or
			// w.ReadFrom(file) -> http.response -> sendfile.
			n, err = io.Copy(w, r.file)
		} else {
			n, err = copyLarge(w, r.file)
		}
		r.off += n
		return n, err
	default:
		if err := r.position(); err != nil {
			return 0, err
		}
		n, err := copyLarge(w, r.rc)
		r.off += n
		r.rcPos += n
		return n, err
	}
}

// copyLarge copies with a 1 MiB buffer, bypassing WriterTo/ReaderFrom
// (whose buffers are small for io.Discard and hashes).
func copyLarge(w io.Writer, src io.Reader) (int64, error) {
	bp := largeBufPool.Get().(*[]byte)
	defer largeBufPool.Put(bp)
	return io.CopyBuffer(struct{ io.Writer }{w}, struct{ io.Reader }{src}, *bp)
}

func (r *Reader) writeFromFill(w io.Writer) (int64, error) {
	bp := bufPool.Get().(*[]byte)
	defer bufPool.Put(bp)
	buf := *bp
	var total int64
	for {
		n, err := r.f.readAt(r.ctx, buf, r.off)
		if n > 0 {
			m, werr := w.Write(buf[:n])
			r.off += int64(m)
			total += int64(m)
			if werr != nil {
				return total, werr
			}
			if m < n {
				return total, io.ErrShortWrite
			}
		}
		if err == io.EOF {
			return total, nil
		}
		if err != nil {
			return total, err
		}
	}
}

// Close releases the reader. It does not stop the fill the reader was
// reading from: that one finishes for the other readers and the cache.
func (r *Reader) Close() error {
	if r.closed {
		return nil
	}
	r.closed = true
	switch {
	case r.f != nil:
		r.cancel()
		r.f.release()
		r.c.release(r.k)
	case r.file != nil:
		_ = r.file.Close()
		r.c.release(r.k)
	default:
		if r.rc != nil {
			_ = r.rc.Close()
		}
		r.c.release(r.k)
	}
	return nil
}
