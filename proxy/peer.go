package proxy

// The peer endpoint lets replicas stream a blob out of one another's
// in-flight fill (proxy/cache Cluster): the replica holding a digest's fill
// lease is the only one that talks to the upstream about it.
//
// It serves bytes by digest alone — tenant isolation was enforced by the
// replica that asks, before it asked — so it is authenticated with a key
// only the replicas hold (derived from the cluster secret), and it never
// starts a fetch: a replica without the blob says 404.

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/pullsecret/pullsecret/proxy/cache"
)

// PeerPath is the prefix of the peer endpoint.
const PeerPath = "/internal/v1/blobs/"

// peerSizeHeader carries the whole blob's size (Content-Length is what
// is left from the offset).
const peerSizeHeader = "Pullsecret-Blob-Size"

// DeriveKey derives a purpose-bound key from the cluster secret, so one
// secret serves the peer endpoint and the upload ids without either key
// revealing the other.
func DeriveKey(secret []byte, purpose string) []byte {
	m := hmac.New(sha256.New, secret)
	m.Write([]byte("pullsecret cluster v1: " + purpose))
	return m.Sum(nil)
}

func peerToken(secret []byte) string { return hex.EncodeToString(DeriveKey(secret, "peer endpoint")) }

// PeerHandler serves GET PeerPath<digest>?offset=N from c's in-flight fills
// and committed entries to callers that present the cluster's peer token.
func PeerHandler(c *cache.Cache, secret []byte, log *slog.Logger) http.Handler {
	want := []byte("Bearer " + peerToken(secret))
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if subtle.ConstantTimeCompare([]byte(r.Header.Get("Authorization")), want) != 1 {
			WriteError(w, r, newError(http.StatusUnauthorized, CodeUnauthorized, "peer endpoint: not a replica of this cluster"))
			return
		}
		if r.Method != http.MethodGet {
			WriteError(w, r, newError(http.StatusMethodNotAllowed, "UNSUPPORTED", "peer endpoint: GET only"))
			return
		}
		d, err := digest.Parse(strings.TrimPrefix(r.URL.Path, PeerPath))
		if err != nil {
			WriteError(w, r, newError(http.StatusBadRequest, "DIGEST_INVALID", "peer endpoint: %v", err))
			return
		}
		off, err := strconv.ParseInt(r.URL.Query().Get("offset"), 10, 64)
		if err != nil && r.URL.Query().Get("offset") != "" || off < 0 {
			WriteError(w, r, newError(http.StatusBadRequest, "RANGE_INVALID", "peer endpoint: bad offset"))
			return
		}
		br, err := c.Blob(r.Context(), d, nil)
		if err != nil {
			if errors.Is(err, cache.ErrNotFound) {
				WriteError(w, r, newError(http.StatusNotFound, "BLOB_UNKNOWN", "peer endpoint: no fill or entry of %s", d))
				return
			}
			WriteError(w, r, newError(http.StatusServiceUnavailable, "UNAVAILABLE", "peer endpoint: %v", err))
			return
		}
		defer br.Close()
		size := br.Size()
		if size >= 0 && off > size {
			WriteError(w, r, newError(http.StatusRequestedRangeNotSatisfiable, "RANGE_INVALID", "peer endpoint: offset past the end"))
			return
		}
		if _, err := br.Seek(off, io.SeekStart); err != nil {
			WriteError(w, r, newError(http.StatusServiceUnavailable, "UNAVAILABLE", "peer endpoint: %v", err))
			return
		}
		h := w.Header()
		h.Set("Content-Type", "application/octet-stream")
		h.Set("Docker-Content-Digest", d.String())
		h.Set(peerSizeHeader, strconv.FormatInt(size, 10))
		if size >= 0 {
			h.Set("Content-Length", strconv.FormatInt(size-off, 10))
		}
		w.WriteHeader(http.StatusOK)
		if _, rerr, werr := copyStream(w, br); rerr != nil && werr == nil {
			// The fill failed: abort, so the asking replica sees a broken
			// stream, never a clean end.
			log.Warn("peer endpoint: fill failed mid-stream", "digest", d, "err", rerr)
			panic(http.ErrAbortHandler)
		}
	})
}

// PeerClient returns the cache.Cluster Peer function: a GET of the peer
// endpoint at addr (a base URL such as http://10.0.0.5:5000).
func PeerClient(secret []byte, dialTimeout time.Duration) func(ctx context.Context, addr string, d digest.Digest, off int64) (cache.Fetched, error) {
	token := "Bearer " + peerToken(secret)
	client := &http.Client{
		Transport: &http.Transport{
			// Replicas talk to each other on private addresses: the
			// upstream dialer's guard does not apply, and no proxy from
			// the environment either.
			DialContext:           (&net.Dialer{Timeout: dialTimeout}).DialContext,
			ResponseHeaderTimeout: 30 * time.Second,
			MaxIdleConnsPerHost:   16,
			DisableCompression:    true,
		},
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
	return func(ctx context.Context, addr string, d digest.Digest, off int64) (cache.Fetched, error) {
		u := strings.TrimSuffix(addr, "/") + PeerPath + d.String() + "?offset=" + strconv.FormatInt(off, 10)
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
		if err != nil {
			return cache.Fetched{}, fmt.Errorf("peer %s: %w", addr, err)
		}
		req.Header.Set("Authorization", token)
		resp, err := client.Do(req)
		if err != nil {
			return cache.Fetched{}, fmt.Errorf("peer %s: %w", addr, err)
		}
		switch resp.StatusCode {
		case http.StatusOK:
		case http.StatusNotFound:
			resp.Body.Close()
			return cache.Fetched{}, fmt.Errorf("peer %s: %w: %s", addr, cache.ErrNotFound, d)
		default:
			resp.Body.Close()
			return cache.Fetched{}, fmt.Errorf("peer %s: %s", addr, resp.Status)
		}
		size, err := strconv.ParseInt(resp.Header.Get(peerSizeHeader), 10, 64)
		if err != nil {
			size = -1
		}
		return cache.Fetched{Body: resp.Body, Size: size}, nil
	}
}
