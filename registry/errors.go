package registry

import (
	"encoding/json"
	"net/http"
	"strconv"
)

// writeError writes a registry-style JSON error
// ({"errors":[{"code":...,"message":...}]}), the body clients parse into
// their error messages.
func writeError(w http.ResponseWriter, status int, code, message string) {
	body, _ := json.Marshal(map[string]any{
		"errors": []map[string]string{{"code": code, "message": message}},
	})
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(len(body)))
	w.WriteHeader(status)
	_, _ = w.Write(body)
}

// errorCode picks the distribution error code a registry would send with
// status for a request to path.
func errorCode(status int, path string) string {
	switch status {
	case http.StatusUnauthorized:
		return "UNAUTHORIZED"
	case http.StatusForbidden:
		return "DENIED"
	case http.StatusNotFound:
		switch {
		case blobPath.MatchString(path):
			return "BLOB_UNKNOWN"
		case manifestPath.MatchString(path):
			return "MANIFEST_UNKNOWN"
		default:
			return "NAME_UNKNOWN"
		}
	case http.StatusMethodNotAllowed:
		return "UNSUPPORTED"
	case http.StatusTooManyRequests:
		return "TOOMANYREQUESTS"
	case http.StatusServiceUnavailable:
		return "UNAVAILABLE"
	default:
		return "UNKNOWN"
	}
}
