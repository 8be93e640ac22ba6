package registry

import (
	"encoding/base64"
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"testing"

	"github.com/google/go-containerregistry/pkg/authn"
)

func TestRequestLog(t *testing.T) {
	t.Parallel()
	for _, c := range []struct {
		name string
		opts []Option
		auth authn.Authenticator
		// paths expected in order, with whether they carried Authorization.
		want []string
	}{
		{"anonymous", nil, authn.Anonymous, []string{
			"GET /v2/ 200 auth=false",
			"GET /v2/t/app/manifests/v1 200 auth=false",
			"GET /v2/t/app/blobs/LAYER 200 auth=false",
			"GET /v2/t/app/blobs/CONFIG 200 auth=false",
		}},
		{"htpasswd", []Option{WithHTPasswd(testUsers)}, &authn.Basic{Username: "alice", Password: "alice-pw"}, []string{
			"GET /v2/ 401 auth=false",
			"GET /v2/t/app/manifests/v1 200 auth=true",
			"GET /v2/t/app/blobs/LAYER 200 auth=true",
			"GET /v2/t/app/blobs/CONFIG 200 auth=true",
		}},
		{"token", []Option{WithTokenAuth(testUsers)}, &authn.Basic{Username: "alice", Password: "alice-pw"}, []string{
			"GET /v2/ 401 auth=false",
			"GET /token 200 auth=true",
			"GET /v2/t/app/manifests/v1 200 auth=true",
			"GET /v2/t/app/blobs/LAYER 200 auth=true",
			"GET /v2/t/app/blobs/CONFIG 200 auth=true",
		}},
	} {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			r := start(t, c.opts...)
			img, err := r.SeedRandom(t.Context(), "t/app", "v1", LayerSize(5000))
			if err != nil {
				t.Fatal(err)
			}
			if _, err := pull(r, r.Ref("t/app", "v1"), c.auth); err != nil {
				t.Fatal(err)
			}
			ls, _ := img.Layers()
			layer, _ := ls[0].Digest()
			config, _ := img.ConfigName()
			repl := strings.NewReplacer(layer.String(), "LAYER", config.String(), "CONFIG")
			var got []string
			for _, e := range r.Requests() {
				got = append(got, repl.Replace(e.Method+" "+e.Path+" "+strconv.Itoa(e.Status)+" auth="+strconv.FormatBool(e.AuthorizationSeen)))
				if e.Time.IsZero() || e.Duration <= 0 || e.Aborted {
					t.Errorf("entry %+v", e)
				}
				if e.Path == "/token" && !strings.Contains(e.Query, "scope=repository%3At%2Fapp%3Apull") {
					t.Errorf("token query %q", e.Query)
				}
			}
			if strings.Join(got, "\n") != strings.Join(c.want, "\n") {
				t.Errorf("requests:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(c.want, "\n"))
			}
			for _, e := range r.Requests() {
				if strings.HasSuffix(e.Path, layer.String()) {
					if size, _ := ls[0].Size(); e.Bytes != size {
						t.Errorf("layer GET recorded %d bytes, want %d", e.Bytes, size)
					}
				}
			}
			r.ResetRequests()
			if n := len(r.Requests()); n != 0 {
				t.Errorf("%d requests after reset", n)
			}
		})
	}
}

func TestBlobFetches(t *testing.T) {
	t.Parallel()
	r := start(t)
	d, err := r.SeedBlob(t.Context(), "t/blob", 100_000)
	if err != nil {
		t.Fatal(err)
	}
	blobURL := r.URL() + "/v2/t/blob/blobs/" + d.String()
	fetch := func(method string, hdr ...string) int {
		t.Helper()
		req, _ := http.NewRequest(method, blobURL, nil)
		for i := 0; i+1 < len(hdr); i += 2 {
			req.Header.Set(hdr[i], hdr[i+1])
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		if _, err := io.Copy(io.Discard, resp.Body); err != nil {
			t.Fatal(err)
		}
		return resp.StatusCode
	}
	steps := []struct {
		name   string
		method string
		hdr    []string
		status int
		want   int // BlobFetches after the step
	}{
		{"HEAD is not a fetch", "HEAD", nil, 200, 0},
		{"GET", "GET", nil, 200, 1},
		{"Range GET", "GET", []string{"Range", "bytes=10-99"}, 206, 2},
		{"unsatisfiable range", "GET", []string{"Range", "bytes=200000-"}, 416, 2},
		{"GET again", "GET", nil, 200, 3},
	}
	for _, s := range steps {
		if got := fetch(s.method, s.hdr...); got != s.status {
			t.Errorf("%s: status %d, want %d", s.name, got, s.status)
		}
		// No sleep: the request is in the log by the time its body is read.
		if got := r.BlobFetches(d.String()); got != s.want {
			t.Errorf("%s: BlobFetches = %d, want %d", s.name, got, s.want)
		}
	}
	// Another digest, and an unknown blob, count separately.
	other := "sha256:" + strings.Repeat("0", 64)
	if got := fetchStatus(t, r.URL()+"/v2/t/blob/blobs/"+other); got != 404 {
		t.Errorf("unknown blob: status %d", got)
	}
	if r.BlobFetches(other) != 0 {
		t.Error("404 counted as a fetch")
	}
}

func fetchStatus(t *testing.T, u string) int {
	t.Helper()
	resp, err := http.Get(u)
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp.StatusCode
}

// TestBlobFetchesConcurrent checks the count is exact under concurrent
// clients, the way "upstream served it exactly once" tests will read it.
func TestBlobFetchesConcurrent(t *testing.T) {
	t.Parallel()
	r := start(t)
	d, err := r.SeedBlob(t.Context(), "t/blob", 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	const n = 20
	var wg sync.WaitGroup
	for range n {
		wg.Go(func() {
			if got := fetchStatus(t, r.URL()+"/v2/t/blob/blobs/"+d.String()); got != 200 {
				t.Errorf("status %d", got)
			}
		})
	}
	wg.Wait()
	if got := r.BlobFetches(d.String()); got != n {
		t.Errorf("BlobFetches = %d, want %d", got, n)
	}
}

func TestRequestHook(t *testing.T) {
	t.Parallel()
	var mu sync.Mutex
	var seen []string
	r := start(t, WithHTPasswd(testUsers), WithRequestHook(func(req *http.Request) {
		mu.Lock()
		seen = append(seen, req.Header.Get("Authorization"))
		mu.Unlock()
	}))
	if _, err := r.SeedRandom(t.Context(), "t/app", "v1"); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	if len(seen) != 0 {
		t.Errorf("hook saw %d seeding requests", len(seen))
	}
	mu.Unlock()
	if _, err := pull(r, r.Ref("t/app", "v1"), &authn.Basic{Username: "bob", Password: "bob-pw"}); err != nil {
		t.Fatal(err)
	}
	want := "Basic " + base64.StdEncoding.EncodeToString([]byte("bob:bob-pw"))
	mu.Lock()
	defer mu.Unlock()
	if len(seen) != len(r.Requests()) {
		t.Errorf("hook saw %d requests, log has %d", len(seen), len(r.Requests()))
	}
	found := false
	for _, h := range seen {
		found = found || h == want
	}
	if !found {
		t.Errorf("hook never saw the Authorization header: %q", seen)
	}
}
