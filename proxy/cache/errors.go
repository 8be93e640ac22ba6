package cache

import (
	"errors"
	"fmt"
	"net/http"

	"github.com/opencontainers/go-digest"
)

var (
	// ErrNotFound: the cache holds no such blob, manifest or tag (and no
	// fetch function was given to fill it).
	ErrNotFound = errors.New("cache: not found")

	// ErrDigestMismatch: the upstream sent content whose digest is not the
	// one asked for. The content was discarded; nothing was cached.
	ErrDigestMismatch = errors.New("cache: upstream content does not match its digest")

	// ErrSizeMismatch: the upstream sent fewer or more bytes than it
	// announced (or than the caller expected). Nothing was cached.
	ErrSizeMismatch = errors.New("cache: upstream content has the wrong size")

	// ErrManifestTooLarge: a manifest is larger than the limit (4 MiB by
	// default, WithMaxManifestSize).
	ErrManifestTooLarge = errors.New("cache: manifest too large")

	// ErrUpstreamUnavailable marks an upstream failure that allows serving
	// stale data: unreachable, a 5xx or a 429. Wrap an error with
	// Unavailable to mark it; any other error (401, 403, 404, a bad
	// response) never allows serving stale.
	ErrUpstreamUnavailable = errors.New("upstream unavailable")

	// ErrNotInRepository: the content is cached but is not known to be in
	// the repository it was requested through, and no check was given to
	// prove that it is (see In).
	ErrNotInRepository = errors.New("cache: content not known to be in this repository")

	// ErrInvalidName: an upstream host, repository, tag or digest that the
	// cache refuses to turn into a storage path.
	ErrInvalidName = errors.New("cache: invalid name")

	// ErrClosed: the cache was closed.
	ErrClosed = errors.New("cache: closed")
)

// Unavailable marks err as an upstream outage that allows serving stale
// data: errors.Is(Unavailable(err), ErrUpstreamUnavailable) and
// errors.Is(Unavailable(err), err) both hold. Unavailable(nil) is nil.
func Unavailable(err error) error {
	if err == nil {
		return nil
	}
	if errors.Is(err, ErrUpstreamUnavailable) {
		return err
	}
	return &unavailableError{err: err}
}

type unavailableError struct{ err error }

func (e *unavailableError) Error() string   { return "upstream unavailable: " + e.err.Error() }
func (e *unavailableError) Unwrap() []error { return []error{ErrUpstreamUnavailable, e.err} }

// StatusAllowsStale reports whether an upstream HTTP status is an outage
// that allows serving stale data: 429 and every 5xx. 401 and 403 never do:
// a revoked credential must bite at once.
func StatusAllowsStale(code int) bool {
	return code == http.StatusTooManyRequests || code >= 500 && code <= 599
}

// FillError is how a failed upstream fill reaches every waiter: which
// content, what went wrong, and (through Unwrap) the cause, one of
// ErrDigestMismatch, ErrSizeMismatch, ErrManifestTooLarge, a context error
// (the fill deadline), ErrClosed or the fetch function's own error.
type FillError struct {
	Kind   Kind
	Digest digest.Digest
	// Phase is "fetch" when the fetch function itself failed (the
	// upstream answered an error or could not be reached), "transfer" when
	// the body failed or did not verify, "spool" for a local disk error.
	Phase string
	Err   error
}

func (e *FillError) Error() string {
	return fmt.Sprintf("cache: %s %s from upstream: %v", e.Kind, e.Digest, e.Err)
}

func (e *FillError) Unwrap() error { return e.Err }
