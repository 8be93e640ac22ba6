package proxy

import (
	"errors"
	"fmt"
	"hash"
	"io"

	v1 "github.com/google/go-containerregistry/pkg/v1"
)

// ErrDigestMismatch is the read error of a blob body whose bytes do not
// hash to the digest asked for.
var ErrDigestMismatch = errors.New("blob content does not match its digest")

// verifier passes a blob body through while hashing it, and withholds the
// final bytes until the digest is checked: a client never receives a whole
// blob that does not match, only an aborted transfer.
type verifier struct {
	r    io.ReadCloser
	h    hash.Hash
	want v1.Hash
	size int64 // expected length, -1 unknown
	n    int64
	err  error // sticky

	// holdback state when size is unknown
	buf     []byte
	pending []byte
	eof     bool
}

func newVerifier(r io.ReadCloser, want v1.Hash, size int64) (*verifier, error) {
	h, err := v1.Hasher(want.Algorithm)
	if err != nil {
		return nil, err
	}
	return &verifier{r: r, h: h, want: want, size: size}, nil
}

func (v *verifier) check() error {
	if fmt.Sprintf("%x", v.h.Sum(nil)) != v.want.Hex {
		return ErrDigestMismatch
	}
	return nil
}

func (v *verifier) Read(p []byte) (int, error) {
	if v.err != nil {
		return 0, v.err
	}
	if len(p) == 0 {
		return 0, nil
	}
	if v.size >= 0 {
		return v.readSized(p)
	}
	return v.readHoldback(p)
}

func (v *verifier) readSized(p []byte) (int, error) {
	left := v.size - v.n
	if left == 0 {
		v.err = io.EOF
		return 0, io.EOF
	}
	if int64(len(p)) < left {
		k, err := v.r.Read(p)
		v.h.Write(p[:k])
		v.n += int64(k)
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		if err != nil {
			v.err = err
		}
		return k, err
	}
	// This read reaches the end: read all of it, verify, then hand it out.
	k, err := io.ReadFull(v.r, p[:left])
	v.h.Write(p[:k])
	v.n += int64(k)
	if err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		v.err = err
		return 0, err
	}
	if err := v.check(); err != nil {
		v.err = err
		return 0, err
	}
	v.err = io.EOF
	return k, nil
}

func (v *verifier) readHoldback(p []byte) (int, error) {
	if v.buf == nil {
		v.buf = make([]byte, 64<<10)
	}
	for {
		if len(v.pending) > 1 {
			k := copy(p, v.pending[:len(v.pending)-1])
			v.pending = v.pending[k:]
			return k, nil
		}
		if v.eof {
			if err := v.check(); err != nil {
				v.err = err
				return 0, err
			}
			if len(v.pending) == 1 {
				p[0] = v.pending[0]
				v.pending = nil
				return 1, nil
			}
			v.err = io.EOF
			return 0, io.EOF
		}
		held := copy(v.buf, v.pending)
		k, err := v.r.Read(v.buf[held:])
		v.h.Write(v.buf[held : held+k])
		v.pending = v.buf[:held+k]
		if err == io.EOF {
			v.eof = true
		} else if err != nil {
			v.err = err
			return 0, err
		}
	}
}

func (v *verifier) Close() error { return v.r.Close() }
