package proxy

// Streaming: blob bytes flow upstream → client as they arrive, through one
// pooled buffer per transfer, so memory stays flat whatever the size. The
// upstream request carries the client request's context: a client that
// disconnects cancels it.

import (
	"io"
	"net/http"
	"sync"
)

// streamBufferSize is the copy buffer of one transfer.
const streamBufferSize = 128 << 10

var bufPool = sync.Pool{New: func() any { b := make([]byte, streamBufferSize); return &b }}

// copyStream copies src to w until EOF. It tells read errors (upstream
// failure, digest mismatch) apart from write errors (client gone). The
// first chunk is flushed at once so the client sees headers and bytes
// without waiting for a buffer to fill.
func copyStream(w io.Writer, src io.Reader) (n int64, readErr, writeErr error) {
	bp := bufPool.Get().(*[]byte)
	defer bufPool.Put(bp)
	buf := *bp
	flushed := false
	for {
		k, err := src.Read(buf)
		if k > 0 {
			m, werr := w.Write(buf[:k])
			n += int64(m)
			if werr != nil {
				return n, nil, werr
			}
			if m < k {
				return n, nil, io.ErrShortWrite
			}
			if !flushed {
				if rw, ok := w.(http.ResponseWriter); ok {
					_ = http.NewResponseController(rw).Flush()
				}
				flushed = true
			}
		}
		if err == io.EOF {
			return n, nil, nil
		}
		if err != nil {
			return n, err, nil
		}
	}
}

// firstChunk reads ahead the first chunk of a body (prime), then serves
// it before the rest.
type firstChunk struct {
	r    io.Reader
	head []byte
	err  error // error that came with the first chunk (io.EOF included)
}

// prime reads the first non-empty chunk; it returns an error only when the
// body failed before yielding a byte (io.EOF is not an error).
func (c *firstChunk) prime() error {
	buf := make([]byte, 32<<10)
	for {
		n, err := c.r.Read(buf)
		if n > 0 || err != nil {
			c.head, c.err = buf[:n], err
			if n == 0 && err != io.EOF {
				return err
			}
			return nil
		}
	}
}

func (c *firstChunk) Read(p []byte) (int, error) {
	if len(c.head) > 0 {
		n := copy(p, c.head)
		c.head = c.head[n:]
		return n, nil
	}
	if c.err != nil {
		return 0, c.err
	}
	return c.r.Read(p)
}
