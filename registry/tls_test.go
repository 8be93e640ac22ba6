package registry

import (
	"bytes"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/authn"
)

func TestTLS(t *testing.T) {
	t.Parallel()
	for _, c := range []struct {
		name string
		opts []Option
		auth authn.Authenticator
	}{
		{"anonymous", []Option{WithTLS()}, authn.Anonymous},
		{"htpasswd", []Option{WithTLS(), WithHTPasswd(testUsers)}, &authn.Basic{Username: "alice", Password: "alice-pw"}},
		{"token", []Option{WithTLS(), WithTokenAuth(testUsers)}, &authn.Basic{Username: "alice", Password: "alice-pw"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			r := start(t, c.opts...)
			if !strings.HasPrefix(r.URL(), "https://") {
				t.Fatalf("URL %q", r.URL())
			}
			img, err := r.SeedRandom(t.Context(), "t/app", "v1")
			if err != nil {
				t.Fatal(err)
			}

			// A client trusting the CA pulls.
			got, err := pull(r, r.Ref("t/app", "v1"), c.auth)
			if err != nil {
				t.Fatalf("pull trusting the CA: %v", err)
			}
			if digestOf(t, got) != digestOf(t, img) {
				t.Error("digest differs")
			}

			// A client with only the system roots does not get through.
			plain := &http.Client{Transport: http.DefaultTransport.(*http.Transport).Clone()}
			_, err = plain.Get(r.URL() + "/v2/")
			var unknownAuthority x509.UnknownAuthorityError
			if !errors.As(err, &unknownAuthority) {
				t.Errorf("client without the CA: err %v, want unknown authority", err)
			}
			// Plain HTTP on the TLS port is refused by the server.
			resp, err := plain.Get("http://" + r.Addr() + "/v2/")
			if err == nil {
				resp.Body.Close()
				if resp.StatusCode != http.StatusBadRequest {
					t.Errorf("plain HTTP: status %d", resp.StatusCode)
				}
			}
		})
	}
}

func TestTLSMaterial(t *testing.T) {
	t.Parallel()
	r := start(t, WithTLS())

	// CAFile holds CACertPEM, alone in its directory (for skopeo --cert-dir).
	b, err := os.ReadFile(r.CAFile())
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(b, r.CACertPEM()) {
		t.Error("CAFile differs from CACertPEM")
	}
	entries, err := os.ReadDir(filepath.Dir(r.CAFile()))
	if err != nil || len(entries) != 1 || !strings.HasSuffix(entries[0].Name(), ".crt") {
		t.Errorf("CA directory: %v %v", entries, err)
	}
	blk, _ := pem.Decode(b)
	ca, err := x509.ParseCertificate(blk.Bytes)
	if err != nil || !ca.IsCA {
		t.Fatalf("CA certificate: %v (IsCA %v)", err, ca != nil && ca.IsCA)
	}

	// The leaf is valid for the names clients use.
	for _, host := range []string{"127.0.0.1", "localhost"} {
		_, port, _ := strings.Cut(r.Addr(), ":")
		resp, err := r.Client().Get("https://" + host + ":" + port + "/v2/")
		if err != nil {
			t.Errorf("%s: %v", host, err)
			continue
		}
		resp.Body.Close()
		if resp.StatusCode != 200 {
			t.Errorf("%s: status %d", host, resp.StatusCode)
		}
	}

	// Another registry's CA is a different CA.
	other := start(t, WithTLS())
	if bytes.Equal(other.CACertPEM(), r.CACertPEM()) {
		t.Error("two registries share a CA")
	}
	if _, err := other.Client().Get(r.URL() + "/v2/"); err == nil {
		t.Error("one registry's CA trusted by the other's client")
	}
}
