package registry

import (
	"bytes"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// testBody is what the plain handler serves.
var testBody = func() []byte {
	b := make([]byte, 100_000)
	for i := range b {
		b[i] = byte(i * 7)
	}
	return b
}()

// plainServer serves testBody with a Content-Length on every path, behind f,
// and counts the requests that reach it.
func plainServer(t *testing.T, f *Faults) (*httptest.Server, *atomic.Int64) {
	t.Helper()
	var hits atomic.Int64
	srv := httptest.NewServer(f.Wrap(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		hits.Add(1)
		w.Header().Set("Content-Length", strconv.Itoa(len(testBody)))
		w.Header().Set("Content-Type", "application/octet-stream")
		w.Write(testBody)
	})))
	t.Cleanup(srv.Close)
	return srv, &hits
}

type result struct {
	resp *http.Response
	body []byte
	err  error // from the request or from reading the body
	took time.Duration
}

func get(c *http.Client, method, url string) result {
	began := time.Now()
	req, _ := http.NewRequest(method, url, nil)
	resp, err := c.Do(req)
	if err != nil {
		return result{err: err, took: time.Since(began)}
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	return result{resp: resp, body: body, err: err, took: time.Since(began)}
}

func TestFaultKinds(t *testing.T) {
	t.Parallel()
	const blob = "/v2/t/app/blobs/sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
	cases := []struct {
		name     string
		path     string
		fault    Fault
		wantHits int64 // requests reaching the handler
		check    func(t *testing.T, res result)
	}{
		{"latency", blob, Latency(80 * time.Millisecond), 1, func(t *testing.T, res result) {
			if res.err != nil || !bytes.Equal(res.body, testBody) {
				t.Fatalf("err %v, %d bytes", res.err, len(res.body))
			}
			if res.took < 80*time.Millisecond {
				t.Errorf("took %v", res.took)
			}
		}},
		{"500", blob, Status(500), 0, wantError(500, "UNKNOWN")},
		{"503", blob, Status(503), 0, wantError(503, "UNAVAILABLE")},
		{"401", blob, Status(401), 0, wantError(401, "UNAUTHORIZED")},
		{"403", blob, Status(403), 0, wantError(403, "DENIED")},
		{"404 blob", blob, Status(404), 0, wantError(404, "BLOB_UNKNOWN")},
		{"404 manifest", "/v2/t/app/manifests/v1", Status(404), 0, wantError(404, "MANIFEST_UNKNOWN")},
		{"404 other", "/v2/t/app/tags/list", Status(404), 0, wantError(404, "NAME_UNKNOWN")},
		{"429", blob, TooManyRequests(1500 * time.Millisecond), 0, func(t *testing.T, res result) {
			wantError(429, "TOOMANYREQUESTS")(t, res)
			if got := res.resp.Header.Get("Retry-After"); got != "2" {
				t.Errorf("Retry-After %q", got)
			}
		}},
		{"truncate", blob, Truncate(1000), 1, func(t *testing.T, res result) {
			if res.resp == nil || res.resp.StatusCode != 200 || res.resp.ContentLength != int64(len(testBody)) {
				t.Fatalf("response %+v, err %v", res.resp, res.err)
			}
			if !errors.Is(res.err, io.ErrUnexpectedEOF) {
				t.Errorf("body error %v, want unexpected EOF", res.err)
			}
			if !bytes.Equal(res.body, testBody[:1000]) {
				t.Errorf("got %d bytes, want the first 1000", len(res.body))
			}
		}},
		{"truncate to nothing", blob, Truncate(0), 1, func(t *testing.T, res result) {
			if res.err == nil || len(res.body) != 0 {
				t.Errorf("err %v, %d bytes", res.err, len(res.body))
			}
		}},
		{"corrupt", blob, Corrupt(12345), 1, func(t *testing.T, res result) {
			if res.err != nil || len(res.body) != len(testBody) {
				t.Fatalf("err %v, %d bytes", res.err, len(res.body))
			}
			want := bytes.Clone(testBody)
			want[12345] ^= 0xff
			if !bytes.Equal(res.body, want) {
				t.Error("body is not testBody with byte 12345 inverted")
			}
			if testBody[12345] != byte(12345*7%256) {
				t.Error("the handler's buffer was modified")
			}
		}},
		{"drop", blob, Drop(), 0, func(t *testing.T, res result) {
			if res.err == nil || res.resp != nil {
				t.Errorf("got a response: %+v, err %v", res.resp, res.err)
			}
		}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			f := NewFaults()
			srv, hits := plainServer(t, f)
			rule := f.MustAdd("GET", `/v2/.*/(blobs|manifests|tags)/`, c.fault)
			c.check(t, get(srv.Client(), "GET", srv.URL+c.path))
			if hits.Load() != c.wantHits {
				t.Errorf("handler reached %d times, want %d", hits.Load(), c.wantHits)
			}
			if rule.Fired() != 1 {
				t.Errorf("rule fired %d times", rule.Fired())
			}
			if c.fault.String() == "no fault" {
				t.Errorf("String() of %s", c.name)
			}
		})
	}
}

func wantError(status int, code string) func(*testing.T, result) {
	return func(t *testing.T, res result) {
		t.Helper()
		if res.err != nil {
			t.Fatal(res.err)
		}
		if res.resp.StatusCode != status {
			t.Errorf("status %d, want %d", res.resp.StatusCode, status)
		}
		if ct := res.resp.Header.Get("Content-Type"); ct != "application/json" {
			t.Errorf("Content-Type %q", ct)
		}
		if got := errorCodeOf(t, bytes.NewReader(res.body)); got != code {
			t.Errorf("error code %q, want %q", got, code)
		}
	}
}

func TestFaultMatching(t *testing.T) {
	t.Parallel()
	f := NewFaults()
	srv, _ := plainServer(t, f)
	c := srv.Client()
	status := func(method, path string) int {
		t.Helper()
		res := get(c, method, srv.URL+path)
		if res.err != nil {
			t.Fatalf("%s %s: %v", method, path, res.err)
		}
		return res.resp.StatusCode
	}

	once := f.MustAdd("GET", "/blobs/", Status(500), Times(1))
	if got := status("GET", "/v2/a/blobs/x"); got != 500 {
		t.Errorf("first GET: %d", got)
	}
	if got := status("GET", "/v2/a/blobs/x"); got != 200 {
		t.Errorf("second GET after Times(1): %d", got)
	}
	if once.Fired() != 1 {
		t.Errorf("Fired = %d", once.Fired())
	}

	head := f.MustAdd("HEAD", "/manifests/", Status(404))
	if got := status("GET", "/v2/a/manifests/v1"); got != 200 {
		t.Errorf("GET under a HEAD rule: %d", got)
	}
	if got := status("HEAD", "/v2/a/manifests/v1"); got != 404 {
		t.Errorf("HEAD: %d", got)
	}
	if got := status("HEAD", "/v2/a/blobs/x"); got != 200 {
		t.Errorf("HEAD on another path: %d", got)
	}

	// Rules apply in order; an exhausted rule lets the next one match.
	twice := f.MustAdd("", "^/v2/b/", Status(502), Times(2))
	any := f.MustAdd("*", "^/v2/b/", Status(503))
	for i, want := range []int{502, 502, 503, 503} {
		if got := status("GET", "/v2/b/blobs/x"); got != want {
			t.Errorf("request %d: %d, want %d", i, got, want)
		}
	}
	if twice.Fired() != 2 || any.Fired() != 2 {
		t.Errorf("fired %d and %d", twice.Fired(), any.Fired())
	}

	f.Remove(any)
	if got := status("GET", "/v2/b/blobs/x"); got != 200 {
		t.Errorf("after Remove: %d", got)
	}
	f.Remove(any) // removing twice is harmless
	f.Clear()
	if got := status("HEAD", "/v2/a/manifests/v1"); got != 200 {
		t.Errorf("after Clear: %d", got)
	}
	if head.Fired() != 1 {
		t.Errorf("HEAD rule fired %d", head.Fired())
	}

	if _, err := f.Add("GET", "(", Status(500)); err == nil {
		t.Error("bad pattern accepted")
	}
	if _, err := f.Add("GET", "", Fault{}); err == nil {
		t.Error("zero Fault accepted")
	}
}

// TestFaultsConcurrent changes rules while requests run; with Times(n) exactly
// n requests get the fault.
func TestFaultsConcurrent(t *testing.T) {
	t.Parallel()
	f := NewFaults()
	srv, _ := plainServer(t, f)
	rule := f.MustAdd("GET", "", Status(500), Times(10))
	var wg sync.WaitGroup
	var failed atomic.Int64
	for i := range 50 {
		wg.Go(func() {
			res := get(srv.Client(), "GET", srv.URL+"/v2/x/blobs/y")
			if res.err != nil {
				t.Error(res.err)
				return
			}
			if res.resp.StatusCode == 500 {
				failed.Add(1)
			}
		})
		if i%10 == 0 {
			wg.Go(func() {
				r := f.MustAdd("POST", "", Latency(time.Millisecond))
				f.Remove(r)
			})
		}
	}
	wg.Wait()
	if failed.Load() != 10 || rule.Fired() != 10 {
		t.Errorf("%d requests failed, rule fired %d times; want 10", failed.Load(), rule.Fired())
	}
}

// TestFaultsInRegistry checks the registry's own fault injector, and that the
// request log records what the client actually got.
func TestFaultsInRegistry(t *testing.T) {
	t.Parallel()
	r := start(t, WithTokenAuth(testUsers))
	d, err := r.SeedBlob(t.Context(), "t/blob", 50_000, RandSeed(3))
	if err != nil {
		t.Fatal(err)
	}
	tok := func() string {
		req, _ := http.NewRequest("GET", r.URL()+"/token?scope=repository:t/blob:pull", nil)
		req.SetBasicAuth("alice", "alice-pw")
		_, tr := do(t, r.Client(), req)
		return tr.Token
	}()
	fetch := func() result {
		req, _ := http.NewRequest("GET", r.URL()+"/v2/t/blob/blobs/"+d.String(), nil)
		req.Header.Set("Authorization", "Bearer "+tok)
		resp, err := r.Client().Do(req)
		if err != nil {
			return result{err: err}
		}
		defer resp.Body.Close()
		body, err := io.ReadAll(resp.Body)
		return result{resp: resp, body: body, err: err}
	}
	last := func() Request {
		reqs := r.Requests()
		return reqs[len(reqs)-1]
	}

	r.Faults().MustAdd("GET", "/blobs/", Truncate(777), Times(1))
	if res := fetch(); res.err == nil || len(res.body) != 777 {
		t.Errorf("truncated fetch: err %v, %d bytes", res.err, len(res.body))
	}
	if e := last(); e.Status != 200 || e.Bytes != 777 || !e.Aborted {
		t.Errorf("truncated fetch recorded as %+v", e)
	}

	r.Faults().MustAdd("GET", "/blobs/", Drop(), Times(1))
	if res := fetch(); res.err == nil {
		t.Error("dropped fetch succeeded")
	}
	if e := last(); e.Status != 0 || e.Bytes != 0 || !e.Aborted {
		t.Errorf("dropped fetch recorded as %+v", e)
	}

	r.Faults().MustAdd("GET", "/blobs/", Status(503), Times(1))
	if res := fetch(); res.err != nil || res.resp.StatusCode != 503 {
		t.Errorf("503 fault: %+v", res)
	}

	want, _ := RandomBlob(3, 50_000).Compressed()
	wantBody, _ := io.ReadAll(want)
	if res := fetch(); res.err != nil || !bytes.Equal(res.body, wantBody) {
		t.Errorf("fetch after the faults ran out: err %v, %d bytes", res.err, len(res.body))
	}
	// Truncated fetches sent bytes and count; the drop and the 503 did not.
	if got := r.BlobFetches(d.String()); got != 2 {
		t.Errorf("BlobFetches = %d, want 2", got)
	}

	// Faults can be shared, and the token endpoint is behind them too.
	shared := NewFaults()
	r2 := start(t, WithTokenAuth(testUsers), WithFaults(shared))
	if r2.Faults() != shared {
		t.Error("WithFaults not used")
	}
	// 403: go-containerregistry retries 5xx with backoff.
	shared.MustAdd("GET", "^/token$", Status(403))
	if _, err := pull(r2, r2.Ref("t/app", "v1"), nil); statusOf(err) != 403 {
		t.Errorf("pull with a failing token endpoint: %v", err)
	}
}

// TestDropOnReusedConnection pins down the behaviour documented on Drop.
func TestDropOnReusedConnection(t *testing.T) {
	t.Parallel()
	for _, c := range []struct {
		times    int
		wantErr  bool
		wantHits int64
	}{
		{1, false, 2}, // the transport's retry goes through
		{2, true, 1},  // the retry is dropped too
	} {
		t.Run(strconv.Itoa(c.times), func(t *testing.T) {
			t.Parallel()
			f := NewFaults()
			srv, hits := plainServer(t, f)
			cl := srv.Client()
			if res := get(cl, "GET", srv.URL+"/warm"); res.err != nil {
				t.Fatal(res.err)
			}
			rule := f.MustAdd("GET", "", Drop(), Times(c.times))
			res := get(cl, "GET", srv.URL+"/x")
			if (res.err != nil) != c.wantErr || hits.Load() != c.wantHits || rule.Fired() != c.times {
				t.Errorf("err %v, handler reached %d times, fired %d", res.err, hits.Load(), rule.Fired())
			}
		})
	}
}
