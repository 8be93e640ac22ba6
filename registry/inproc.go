package registry

import (
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
)

// inprocTransport serves requests for one scheme://host by calling a handler
// directly. The Seed helpers use it so that seeding goes through the
// registry's real authentication and storage but never through the network
// listener: it is not in the request log, hooks and faults do not see it.
//
// Responses are buffered (httptest.ResponseRecorder), which suits pushes:
// request bodies stream in, responses are small.
type inprocTransport struct {
	h      http.Handler
	scheme string
	host   string
}

func (t *inprocTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	if req.URL.Scheme != t.scheme || req.URL.Host != t.host {
		if req.Body != nil {
			_ = req.Body.Close()
		}
		// go-containerregistry pings https and http for loopback hosts;
		// failing the wrong scheme lets it settle on the right one.
		return nil, fmt.Errorf("registry: in-process transport serves %s://%s only, not %s://%s",
			t.scheme, t.host, req.URL.Scheme, req.URL.Host)
	}
	sreq := req.Clone(req.Context())
	sreq.RequestURI = req.URL.RequestURI()
	sreq.RemoteAddr = "127.0.0.1:0"
	if sreq.ContentLength > 0 {
		// A server-side request carries the header too; distribution
		// checks it against Content-Range.
		sreq.Header.Set("Content-Length", strconv.FormatInt(sreq.ContentLength, 10))
	}
	if sreq.Host == "" {
		sreq.Host = req.URL.Host
	}
	if sreq.Body == nil {
		sreq.Body = http.NoBody
	} else {
		// Hide any WriterTo of the client's body, as a network body would.
		// distribution's upload handler io.Copies the body into a blobWriter
		// whose ReadFrom must be called once per request: a WriterTo (an
		// io.MultiReader, say) calls it once per part, and from the second
		// call on the resumable-digest check sees the buffered inmemory
		// writer's Size() lag behind, resets the hash and the upload fails
		// with DIGEST_INVALID.
		sreq.Body = struct{ io.ReadCloser }{sreq.Body}
	}
	rec := httptest.NewRecorder()
	t.h.ServeHTTP(rec, sreq)
	_ = sreq.Body.Close()
	resp := rec.Result()
	resp.Request = req
	return resp, nil
}
